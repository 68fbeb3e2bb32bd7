"""Dispatch between the Triton kernels and their references: the CPU default is the reference, a forced but
impossible 'triton' is a clear error, and the package imports and works without triton installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import LAUNCHERS, WHY_NOT, spy_launchers
from tokdistill_fast.kernels import backend
from tokdistill_fast.kernels.embedding_rows import embedding_rows
from tokdistill_fast.kernels.masked_mse import masked_mse

from tokdistill_fast import DistillConfig, UserInputError, distill, env_report

interpreted = backend.INTERPRET and backend.triton is not None


def test_dispatch_starts_the_kernels_only_where_they_can_run(monkeypatch):
    """Which path runs is seen at the launchers: "torch" never starts a kernel, "auto" on CPU starts them only
    under the interpreter (and gives the references' values there)."""
    launches = spy_launchers(monkeypatch)
    assert backend.resolve("auto", "cpu") == ("triton" if interpreted else "torch")
    g = torch.Generator().manual_seed(0)
    table, new_rows = torch.randn(20, 9, generator=g), torch.randn(3, 9, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 20, 5, 22], [21, 21, 19, 1]])
    S, T = torch.randn(8, 9, generator=g, requires_grad=True), torch.randn(8, 9, generator=g)
    idx = torch.tensor([1, 4, 6])

    def both(which: str) -> list[torch.Tensor]:
        out = embedding_rows(ids, table, new_rows, 2.0, backend=which)
        loss = masked_mse(S, T, idx, idx, backend=which)[0]
        return [out, loss, *torch.autograd.grad(out.sum() + loss, (new_rows, S))]

    want = both("torch")
    assert not launches, f"backend='torch' started kernels: {dict(launches)}"
    got = both("auto")
    assert set(launches) == ({n for names in LAUNCHERS.values() for n in names} if interpreted else set())
    for g_, w in zip(got, want):  # under the interpreter: kernels against the references
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(WHY_NOT is None, reason="the kernels can run here")
def test_forced_triton_that_cannot_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="backend='triton' cannot run"):
        masked_mse(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0]), torch.tensor([1]), backend="triton")
    with pytest.raises(UserInputError, match="backend='triton' cannot run"):  # before any model is loaded
        distill(tmp_path, ["word"], config=DistillConfig(backend="triton", device="cpu"))


def test_unknown_backend_and_foreign_device_are_refused():
    with pytest.raises(UserInputError, match="backend must be one of"):
        backend.resolve("cuda", "cpu")
    with pytest.raises(ValueError, match="T on meta"):
        backend.check_device("masked_mse", torch.device("cpu"), T=torch.empty(2, device="meta"))


def test_env_report_says_whether_kernels_run():
    """From first principles, not from the function env_report() is built on: triton importable, and CUDA or the
    interpreter."""
    can = importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    assert env_report()["triton_kernels"].startswith("yes" if can else "no")
    from tokdistill_fast.modeling import fused  # and whether the C++ layer kernels loaded, beside the aligner

    assert env_report()["fused_ext"] == (fused.extension() is not None)


def test_works_without_triton_installed():
    """A CPU install without triton: importing and the reference paths work, forcing 'triton' says why not."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from tokdistill_fast import UserInputError
from tokdistill_fast.kernels import backend
from tokdistill_fast.kernels.embedding_rows import embedding_rows
from tokdistill_fast.kernels.masked_mse import masked_mse
assert backend.triton is None and backend.resolve("auto", "cpu") == "torch"
out = embedding_rows(torch.tensor([0, 3]), torch.ones(3, 4), torch.zeros(1, 4, requires_grad=True))
loss, _ = masked_mse(out, out.detach() + 1, torch.tensor([0, 1]), torch.tensor([1, 0]))
loss.backward()
try:
    backend.resolve("triton", "cpu")
except UserInputError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("no error")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_checkout_kernels_folder_does_not_shadow_hugging_face_kernels(tmp_path):
    """Run from a checkout, the repository root comes first on sys.path and its kernels/ folder would be found as
    the top-level `kernels` that transformers 5.25 imports (Hugging Face's package): it loads that package in its
    place (a stand-in here); tokdistill_fast.kernels is unaffected."""
    root = Path(__file__).resolve().parents[1]
    stand_in = tmp_path / "site" / "kernels"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("WHO = 'hugging face'\n")
    code = "import kernels, tokdistill_fast.kernels.backend as b; print(kernels.WHO, b.__name__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["hugging", "face", "tokdistill_fast.kernels.backend"], \
        done.stderr
    env["PYTHONPATH"] = ""  # no package of that name installed: the empty module it always was, without a version
    code = ("import sys; sys.path = [p for p in sys.path if p and 'site-packages' not in p] + ['']; import kernels; "
            "print(kernels.__file__, hasattr(kernels, '__version__'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == [str(root / "kernels" / "__init__.py"), "False"], \
        done.stderr
