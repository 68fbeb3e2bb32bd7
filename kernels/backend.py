"""Which implementation an op runs: its Triton kernel or its plain-PyTorch reference.

"auto" picks the kernel when triton imports and either the tensors are on CUDA or TRITON_INTERPRET=1 is set (then
Triton runs kernels on CPU tensors, slowly: that is how CPU-only CI tests the kernel code); else the reference.
"torch" forces the reference, "triton" forces the kernel and raises when it cannot run. Both flags below are
computed once, at import: Triton itself reads TRITON_INTERPRET when a kernel is defined, so setting it later has
no effect on kernels already defined.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tokdistill_fast.config import UserInputError, env_flag
from tokdistill_fast.control import observed

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as e:  # CPU installs without triton: the references still work
    triton = None
    # Lets the kernels' signatures and constants below parse; their bodies never run.
    tl = SimpleNamespace(constexpr=lambda value=None: value)

    def jit(fn):
        """Stand-in for triton.jit: resolve() never selects a kernel when triton is missing."""
        return fn

    TRITON_IMPORT_ERROR = str(e)

INTERPRET = env_flag("TRITON_INTERPRET")
BACKENDS = ("auto", "torch", "triton")
# Passed to every launch. FP fusion on: a * b + c becomes one FMA (one rounding). Pinned because Triton 3.9 warns
# that its default flips to off in 3.10.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
# Triton 3.9's interpreter casts fp32 to bf16 by truncating the mantissa (runtime/interpreter.py, _convert_float),
# where GPUs round to nearest even; under the interpreter, cast() rounds by hand so CPU tests check GPU numerics.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even also under the interpreter (finite x)."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # adds half an ulp of bf16, or just under it when the kept bit is even
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


def resolve(backend: str, device: torch.device | str) -> str:
    """'torch' or 'triton' for tensors on `device`; UserInputError when 'triton' is asked for but cannot run."""
    if backend not in BACKENDS:
        raise UserInputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch":
        return "torch"
    why_not = unusable_reason(torch.device(device))
    if why_not is None:
        return "triton"
    if backend == "triton":
        raise UserInputError(f"backend='triton' cannot run: {why_not}; use backend='torch' or 'auto'")
    return "torch"


def dispatch(backend: str, device: torch.device) -> str:
    """resolve() for one op call, noted as what ran (tokdistill_fast/control/observed.py); "auto" falling back to the
    references on CUDA warns once per run."""
    impl = resolve(backend, device)
    observed.note("kernels", impl, fallback=None if impl == "triton" or backend != "auto" or device.type != "cuda"
                  else f"Triton kernels unusable on CUDA ({unusable_reason(device)}): the embedding gather and masked "
                  "MSE run as PyTorch references, up to 74x and 7.5x slower per call on an H100 "
                  "(bench/results/kernels.json)")
    return impl


def unusable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of `device`, else why not (one phrase)."""
    if triton is None:
        return f"triton is not installed ({TRITON_IMPORT_ERROR})"
    if device.type != "cuda" and not INTERPRET:
        return f"tensors are on {device.type}; the kernels need CUDA, or TRITON_INTERPRET=1 to run on CPU"
    return None


def status() -> str:
    """For env_report(): whether the kernels would run on this machine's default device, and how."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why_not = unusable_reason(device)
    if why_not is not None:
        return f"no: {why_not}"
    return "yes (Triton interpreter, slow)" if INTERPRET else f"yes (triton {triton.__version__}, CUDA)"


def check_device(op: str, device: torch.device, **tensors: torch.Tensor) -> None:
    """A kernel given a tensor on another device would read a foreign pointer: refuse with the names."""
    wrong = [f"{name} on {t.device}" for name, t in tensors.items() if t.device != device]
    if wrong:
        raise ValueError(f"{op}: all inputs must be on {device}, but {', '.join(wrong)}")


def row_major(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last dim (what the kernels index with one row stride); no copy if it has."""
    return x if x.stride(-1) == 1 else x.contiguous()
