"""tokdistill-fast: input embeddings for new tokens by Token Distillation, fast.

The pipeline stages are the modules at the top of the package, in the order a run calls them (pipeline.py):
  tokens.py     1 new tokens -> tokenizer additions (extend.py: the extended tokenizer; swap.py: words from a
                tokenizer, --init-from rows)
  contexts.py   2 snippets per new token from the corpus (corpus.py reads it; workload.py adds the model's top-up,
                continuations of a token's snippets or generations from the word, and the alignment)
  align.py      3 alignment maps (C++ fast path csrc/align.cpp, Python spec)
  teacher.py    4 truncated teacher pass, packed cache of the aligned states
  student/      5 train the new rows (rows.py: start rows, norm clip)
  export.py     6 write the HF model and tokenizer; check.py verifies it, report.py describes the run
  pipeline.py   prepare / settle / teacher_cache / learn_rows / write_output; distill_words() runs them once
                (results.py: what the stages hand on; hubs.py, retrain.py: the checks and retries after a run)
  target_tokenizer.py  the same run for a given extended tokenizer (bring your own tokenizer)
  api.py        distill(): one run of either
Subpackages: modeling/ (the frozen decoder, attention, layouts, losses, the CPU fast path), control/
(settings and the search, chunks, checkpoints, several processes, the command line's process settings),
evaluation/ (held-out measure, `eval`, `compare`), tools/ (select, demo, BPE extension, llama.cpp check), kernels/
(Triton kernels with their references). cli.py parses, config.py holds every setting.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import DistillConfig, UserInputError, launch, silence_progress_bars  # noqa: E402

if launch().rank > 0:  # torchrun ranks other than 0: no bars, whether or not they run the command line
    silence_progress_bars()

from .tools.select import select_tokens  # noqa: E402


def __getattr__(name: str):
    """`distill` and `DistillResult` load the pipeline (and torch) when first used, so that the command line can
    set up the process before torch loads (control/process.py)."""
    if name in ("distill", "DistillResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def env_report() -> dict:
    """Versions, devices and which compiled pieces loaded: the first thing a bug report needs."""
    import platform

    import torch
    import transformers

    from . import align
    from .config import cpu_has_fast_bf16
    from .control import process
    from .kernels import backend
    from .modeling import fused

    info = {"tokdistill_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_fast_bf16": cpu_has_fast_bf16(),
            "mkl_dispatch": process.mkl_dispatch(), "align_ext": align._align_ext is not None,
            "fused_ext": fused.extension() is not None,
            "triton_kernels": backend.status()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


__all__ = ["DistillConfig", "DistillResult", "UserInputError", "distill", "select_tokens", "env_report", "__version__"]
