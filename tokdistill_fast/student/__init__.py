"""Stage 5: train only the new embedding rows so the student (one new token) reproduces the teacher.

loop.py      train(): the optimizer loop over prepared steps (Schedule, TrainResult)
objective.py Objective: what a step optimizes (the four objectives) and the layers it reads; Trainable: its rows
steps.py     the steps, prepared on the host: batches, prefix-sharing passes, groups of disjoint steps
feed.py      TargetFeed: each step's teacher targets on the compute device
"""

from .loop import Schedule, TrainResult, train
from .objective import Objective, Trainable
from .steps import Batch, Group, Passes, batch_plan, group_steps, make_batch, resolve_passes, student_states

__all__ = ["Batch", "Group", "Objective", "Passes", "Schedule", "TrainResult", "Trainable", "batch_plan",
           "group_steps", "make_batch", "resolve_passes", "student_states", "train"]
