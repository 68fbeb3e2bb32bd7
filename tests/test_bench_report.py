"""bench/report.py turns a pytest-benchmark JSON file into the kernels' Markdown table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(group: str, impl: str, median: float, min_bytes: int, output: list | None = None) -> dict:
    return {"group": group, "name": f"test[{impl}]", "params": {"impl": impl},
            "stats": {"median": median, "iqr": median / 10},
            "extra_info": {"min_bytes": min_bytes, "device": "NVIDIA H100 80GB HBM3", "output": output}}


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def table_rows(path: Path) -> tuple[list[str], str]:
    """The table rows bench.report prints for `path` (header and rule left out), and all it printed."""
    done = run_report(str(path))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "reference ms" not in line]
    return rows, done.stdout


def test_report_table(tmp_path):
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"benchmarks": [
        bench("masked_mse K=400", "torch", 2e-4, 10**6, [[10.0, 3.0], [2.0, -1.0]]),
        bench("masked_mse K=400", "triton", 5e-5, 10**6, [[10.0, 3.05], [2.0, -1.0]]),
        *(bench("embedding_rows 16x50", impl, median, 3 * 10**9)
          for impl, median in (("torch", 1e-3), ("triton", 1e-3), ("triton-deterministic", 2e-3)))]}))
    rows, printed = table_rows(path)
    assert rows == ["| masked_mse K=400 | triton | 0.200 (0.020) (torch) | 0.050 (0.005) | 4.00x | 5.0e-03 | 20 |",
                    "| embedding_rows 16x50 | triton | 1.000 (0.100) (torch) | 1.000 (0.100) | 1.00x | - | 3000 |",
                    "| embedding_rows 16x50 | triton-deterministic | 1.000 (0.100) (torch) | 2.000 (0.200) | 0.50x | - "
                    "| 1500 |"]
    assert "NVIDIA H100 80GB HBM3" in printed


def test_report_reads_the_alignment_and_optimizer_files(tmp_path):
    """The alignment benchmarks name their implementation in the test name (python is the reference), the
    optimizer's in a parameter beside its device, with no reference: each gets its rows, none a traceback."""
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "AMD EPYC"}}, "benchmarks": [
        {"group": "alignment", "name": f"test_alignment_{impl}", "params": None,
         "stats": {"median": median, "iqr": 0.0},
         "extra_info": {"snippets": 64} | ({"output_vs_reference": "identical"} if impl == "cpp" else {})}
        for impl, median in (("cpp", 1e-3), ("python", 3e-2))] + [
        {"group": "optimizer step", "name": f"test_step[cpu-{impl}]", "params": {"device": "cpu", "impl": impl},
         "stats": {"median": 2e-3, "iqr": 1e-4}, "extra_info": {}} for impl in ("adamw", "whitened-rows")]}))
    rows, printed = table_rows(path)
    assert rows == ["| alignment | cpp | 30.000 (0.000) (python) | 1.000 (0.000) | 30.00x | identical | - |",
                    "| optimizer step | adamw | - | 2.000 (0.100) | - | - | - |",
                    "| optimizer step | whitened-rows | - | 2.000 (0.100) | - | - | - |"]
    assert printed.startswith("device: AMD EPYC, cpu;")


def test_missing_file_is_a_clear_error(tmp_path):
    done = run_report(str(tmp_path / "nothing.json"))
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_recorded_outputs_tell_a_wrong_result_from_rounding():
    """bench.outputs' digest: an output rounded to bf16 reads a small difference from the fp32 one, the same values
    in another order (a kernel that writes rows to the wrong place) a difference of the order of the output."""
    from types import SimpleNamespace

    import torch

    from bench.outputs import record, relative_difference

    x = torch.randn(118, 576, generator=torch.Generator().manual_seed(0))
    digests = []
    for y in (x, x.bfloat16(), x.flip(0)):
        record(b := SimpleNamespace(extra_info={}), y, 2 * y)
        digests.append(b.extra_info["output"])
    assert relative_difference(digests[1], digests[0]) < 1e-2
    assert relative_difference(digests[2], digests[0]) > 0.5
    assert relative_difference(digests[0][:1], digests[0]) is None
