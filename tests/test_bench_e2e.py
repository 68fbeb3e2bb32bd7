"""bench.e2e runs the whole pipeline on CPU with the tiny config, fast and reference paths, and writes its
results file with consistent numbers."""

import json

from bench import e2e


def test_e2e_tiny_on_cpu(tmp_path):
    assert e2e.main(["--config", "tiny", "--new-tokens", "12", "--target-layer", "2", "--snippets", "4",
                     "--snippet-length", "20", "--reference", "--device", "cpu", "--results-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu-tiny-L2-reference.json").read_text())
    fast, ref = record["fast"], record["reference"]
    assert fast["implementations"]["prefix_sharing"] == "fused"
    assert fast["implementations"]["packed_attention"] == "dense SDPA"
    assert ref["implementations"]["prefix_sharing"] == "off" and ref["implementations"]["packed_attention"] is None
    assert fast["counts"]["added"] >= 12 and set(record["subtoken_histogram"]) <= {"2", "3", "4", "5"}
    # prefix sharing computes fewer positions with gradient than whole sequences, and both runs saw the same text
    assert fast["positions"]["student_bwd"] < ref["positions"]["student_bwd"]
    assert fast["positions"]["teacher_fwd"] == ref["positions"]["teacher_fwd"]
    assert fast["tflop"] < fast["reference_work_tflop"] == ref["reference_work_tflop"]
    assert record["embedding_cosine"]["min"] > 0.999
    assert record["matmul_peak_tflops"] > 0 and fast["achieved_tflops"] > 0
