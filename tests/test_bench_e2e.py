"""bench.e2e runs the whole pipeline on CPU with the tiny config (the library's defaults, search included), the
plain path and the plain path in bf16 (its noise floor), and writes its results file: held-out loss falls, and the
fast path sits within the plain path's own noise floor."""

import json

import pytest
import torch

from bench import e2e
from tokdistill_fast import DistillConfig, align
from tokdistill_fast.modeling import fused


def test_e2e_tiny_on_cpu(tmp_path):
    # 12 snippets per word: with 4 (and the 4-position loss) the tiny random model's held-out loss moved by 1e-3, less
    # than bf16 rounding moves the noise-floor run; with 8 and the more epochs it rose (7.0574 -> 7.0656)
    assert e2e.main(["--config", "tiny", "--new-tokens", "12", "--snippets", "12",
                     "--snippet-length", "20", "--reference", "--device", "cpu", "--results-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu-tiny-Lauto-reference.json").read_text())
    fast, ref, other = record["fast"], record["reference"], record["reference_other_dtype"]
    assert fast["settings"]["searched"] and fast["autotune"]["trials"]  # layer "auto": the search ran and was timed
    assert fast["seconds"]["autotune"] > 0 and ref["settings"]["lr"] == fast["settings"]["lr"]
    # what ran, observed at run time: prefix steps reading the teacher's kept keys/values (the default epochs),
    # their attention, the aligners, the kernels, the cache
    assert fast["implementations"]["prefix_sharing"] == "cached"
    assert fast["settings"]["epochs"] == DistillConfig().epochs
    assert fast["implementations"]["packed_attention"] == ("fused" if fused.extension() is not None else "dense")
    assert fast["implementations"]["layers"] == ("cpp" if fused.extension() is not None else "torch")
    assert ref["implementations"]["layers"] == "torch"  # the plain path runs the Hugging Face layers
    assert ref["implementations"]["prefix_sharing"] == "off" and ref["implementations"]["packed_attention"] is None
    assert fast["implementations"]["align"] == ("cpp" if align._align_ext is not None else "python")
    assert ref["implementations"]["align"] == "python" and ref["implementations"]["backend"] == "torch"
    assert ref["implementations"]["teacher_cache"] == "device"
    assert (ref["settings"]["dtype"], other["settings"]["dtype"]) == ("float32", "bfloat16")
    assert fast["counts"]["added"] >= 12 and set(record["subtoken_histogram"]) <= {"2", "3", "4", "5"}
    # prefix sharing computes fewer positions with gradient than whole sequences, and both runs saw the same text
    assert fast["positions"]["student_bwd"] < ref["positions"]["student_bwd"]
    assert fast["positions"]["teacher_fwd"] == ref["positions"]["teacher_fwd"]
    assert fast["tflop"] < fast["reference_work_tflop"] == ref["reference_work_tflop"]
    assert record["matmul_peak_tflops"] > 0 and fast["achieved_tflops"] > 0
    # it learns: the objective on held-out snippets and on the trained text falls from subtoken-mean init, and no
    # row needed clipping
    for run in (fast, ref, other):
        assert run["heldout_loss_after"] < run["heldout_loss_before"], run
        assert run["train_loss_after"] < run["train_loss_before"], run
        assert run["epoch_loss"][-1] < run["epoch_loss"][0], run  # the training curve over the same snippets
        assert run["norm_clipped"] == 0
    # the same answers: fast vs plain deviates no more than twice what bf16 vs fp32 does to the plain path
    agreement = record["agreement"]
    floor = agreement["noise_floor"]
    assert 0 < 1 - floor["embedding_cosine"]["mean"] and 0 < floor["heldout_loss_diff"]  # a floor to sit within
    assert agreement["within_floor"], agreement


def test_e2e_keeps_the_first_layers_of_a_config(tmp_path):
    """--num-layers: a config's width with fewer layers (the 8B width on a CPU), named so in the results file."""
    assert e2e.main(["--config", "tiny", "--num-layers", "2", "--new-tokens", "6", "--snippets", "6",
                     "--snippet-length", "20", "--target-layer", "2", "--heldout-tokens", "3", "--device", "cpu",
                     "--results-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu-tiny-2-layers-L2.json").read_text())
    assert record["model_config"]["num_hidden_layers"] == 2 and record["config"] == "tiny-2-layers"
    assert record["fast"]["settings"]["target_layer"] == 2


def test_profile_counts_operators_per_pass(capsys):
    from bench import profile_gpu

    def parts(layer: int, *flags: str) -> dict[str, float]:
        assert profile_gpu.main(["--config", "tiny", "--new-tokens", "8", "--layer", str(layer), "--count-ops",
                                 "--device", "cpu", *flags]) == 0
        lines = capsys.readouterr().out.splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("main run"))
        counts = {line[:20].strip(): float(line[20:]) for line in lines[head + 1:] if line.startswith("  ")}
        assert counts["optimizer step"] > 0 and counts["backward"] > 0
        return counts

    def layer_ops(*flags: str) -> float:
        """Operators (and fused kernels) one more layer adds to a pass, forward and backward."""
        one, two = parts(1, *flags), parts(2, *flags)
        # the decoder's operators grow with the layers run; the optimizer's do not
        assert two["decoder forward"] > one["decoder forward"] and two["backward"] > one["backward"]
        assert two["optimizer step"] == one["optimizer step"]
        return two["decoder forward"] + two["backward"] - one["decoder forward"] - one["backward"]

    fast, plain = layer_ops(), layer_ops("--plain-layers")
    if fused.layer_kernels(torch.device("cpu"), torch.float32) is not None:  # the fused kernels: fewer launches
        assert fast < 0.6 * plain, (fast, plain)


def test_profile_names_a_layer_the_config_lacks(capsys):
    """The 8B config's default --layer 8 on the tiny config is a usage error naming its layers, not a traceback."""
    from bench import profile_gpu

    with pytest.raises(SystemExit) as e:
        profile_gpu.main(["--config", "tiny", "--count-ops", "--device", "cpu"])
    assert e.value.code == 2 and "--layer 8: the tiny config has layers 1..4" in capsys.readouterr().err
