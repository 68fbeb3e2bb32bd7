"""tokdistill-fast: input embeddings for new tokens by Token Distillation, fast."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import DistillConfig, UserInputError, launch, silence_progress_bars  # noqa: E402

if launch().rank > 0:  # torchrun ranks other than 0: no bars (tqdm reads its settings when it is first imported)
    silence_progress_bars()

from .pipeline import DistillResult, distill  # noqa: E402
from .select import select_tokens  # noqa: E402


def env_report() -> dict:
    """Versions, devices and which compiled pieces loaded: the first thing a bug report needs."""
    import platform

    import torch
    import transformers

    from . import align, models
    from .kernels import backend

    info = {"tokdistill_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_fast_bf16": models.cpu_has_fast_bf16(), "align_ext": align._align_ext is not None,
            "triton_kernels": backend.status()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


__all__ = ["DistillConfig", "DistillResult", "UserInputError", "distill", "select_tokens", "env_report", "__version__"]
