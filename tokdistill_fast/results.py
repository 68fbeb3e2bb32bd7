"""What the stages of a run hand on: `Prepared` (stages 1-3, shared by every method trained on them), `Learned`
(stage 5 for one method: pipeline.learn_rows, hubs.py, retrain.py) and `DistillResult` (a whole run: api.distill)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import DistillConfig
from .control.checkpoint import WorkDir
from .control.observed import StageTimer
from .modeling.models import Decoder
from .student import TrainResult
from .tokens import NewToken, Skipped
from .workload import Workload


@dataclass
class DistillResult:
    """What a run produced. `rows`/`out_rows` are aligned with `tokens` (table space, fp32)."""

    tokenizer: object
    tokens: list[NewToken]
    rows: torch.Tensor
    out_rows: torch.Tensor | None
    report: dict
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class Prepared:
    """Stages 1-3 of a run, shared by every method trained on them."""

    cfg: DistillConfig
    decoder: Decoder  # the model loaded for compute (device, dtype)
    tokenizer: object  # the model's tokenizer
    new_tokenizer: object  # extended with the new tokens
    toks: list[NewToken]
    skipped: list[Skipped]
    work: Workload | None  # snippets and alignment of the tokens to train (None: nothing is trained)
    tied: bool
    device: torch.device
    dtype: torch.dtype
    backend: str  # kernels: torch | triton (resolved)
    source: object  # the model directory (Path) or the caller's in-memory model, for the output
    corpus: list
    timer: StageTimer
    work_dir: WorkDir  # checkpoints of a run that keeps them (disabled otherwise)
    tokenizer_seconds: float | None = None  # how long the run's load of the model's tokenizer took
    words_from: str = ""  # where the words came from (report.json's inputs)
    init: tuple | None = None  # the --init-from file as swap.read_init read it (None without one)


@dataclass
class Learned:
    """New rows of one method (aligned with the token list, fp32 on the CPU) and how they were obtained."""

    rows: torch.Tensor
    out_rows: torch.Tensor | None  # untied models only
    train_result: TrainResult | None
    clipped: int
    init_used: set[int] = field(default_factory=set)  # tokens that started from --init-from rows
    derived: list[int] = field(default_factory=list)  # variants whose rows were moved from their primary's
    retried: dict[int, dict] = field(default_factory=dict)  # outliers trained again alone (retrain.retry_outliers)
    hardest: dict[int, dict] = field(default_factory=dict)  # more epochs alone (retrain.continue_hardest)
    mass: tuple | None = None  # hubs.new_token_mass of these rows, where a check (more epochs, hardest) measured them
    more: dict | None = None  # what the more epochs did (hubs.keep_more_epochs)
    variants: dict[int, dict] = field(default_factory=dict)  # trained on their own snippets (retrain.train_variants)
    extra: dict[str, int] = field(default_factory=dict)  # epochs of each extra stage run (pipeline.extra_epochs)
