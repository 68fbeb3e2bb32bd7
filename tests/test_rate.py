"""The learning rate for runs whose rows step rarely (student/steps.py: step_spacing, rate_scale): Adam's moments
decay on the steps a row sits out, so the rate shrinks as sqrt(SPACING_REF / spacing) beyond SPACING_REF."""

import numpy as np
import pytest

from tokdistill_fast import DistillConfig
from tokdistill_fast.student import steps
from tokdistill_fast.student.steps import rate_scale, step_spacing


def test_step_spacing_counts_steps_per_step_of_a_row():
    row = np.array([0, 0, 1, 1])  # snippet -> row
    assert step_spacing([np.array([0, 2]), np.array([1, 3])], row) == 1.0  # every row in every step
    assert step_spacing([np.array([0, 1]), np.array([2, 3])], row) == 2.0  # every other step
    assert step_spacing([np.array([i]) for i in range(4)], row) == 2.0


def test_rate_scale_keeps_the_rate_up_to_the_reference_spacing():
    assert rate_scale(1.0) == rate_scale(steps.SPACING_REF) == 1.0
    assert rate_scale(4 * steps.SPACING_REF) == pytest.approx(0.5)


@pytest.mark.parametrize("combo", [("llama", "bytelevel", True), ("qwen2", "bytelevel", False)])
def test_rows_that_step_rarely_train_at_a_smaller_rate(model_dirs, words_file, corpus_file, monkeypatch, combo):
    """The run reports its plan's spacing and the rate its rows trained at: the given one up to SPACING_REF,
    scaled beyond it (batch 1 over four words: each step trains one row, spacing ~4), for tied and untied models
    (untied ones keep their output rows and train the input rows alone)."""
    from tokdistill_fast import distill

    cfg = DistillConfig(snippets_per_token=6, snippet_length=24, batch_size=1, epochs=1, target_layer=2, lr=0.01,
                        ntp_guard=False, dtype="float32")
    model = model_dirs[combo]
    monkeypatch.setattr(steps, "SPACING_REF", 2.0)
    scaled = distill(model, words_file, [corpus_file], None, cfg)
    monkeypatch.setattr(steps, "SPACING_REF", 100.0)
    plain = distill(model, words_file, [corpus_file], None, cfg)
    spacing = scaled.report["training"]["step_spacing"]
    assert spacing == plain.report["training"]["step_spacing"] > 2.0
    assert scaled.report["training"]["lr"] == pytest.approx(0.01 * (2.0 / spacing) ** 0.5, rel=1e-3)
    assert plain.report["training"]["lr"] == 0.01
    assert (scaled.rows - plain.rows).abs().max() > 0  # the rate reached the steps
