"""What actually ran, and how long each stage took (`StageTimer`). Each fast-path site notes the implementation it
used while distill() records, so the report states what happened (not what the config asked for), and a fallback
from a fast path a user would expect logs one warning line per run saying what it costs.

Sites and names: "align" (cpp | python), "kernels" (triton | torch), "attention" (flash varlen | fused | dense:
the packed passes of prefix sharing), "layers" (cpp | triton | torch: the decoder layers' norms, rotations and
activations), "teacher_cache" (device | host). A site that never ran is absent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

log = logging.getLogger("tokdistill_fast")

_active: ContextVar[tuple[dict[str, Counter], ...]] = ContextVar("tokdistill_observed", default=())


@contextmanager
def recording() -> Iterator[dict[str, Counter]]:
    """Collect notes while the block runs: {site: Counter(implementation -> uses)} (nested recordings all see
    them)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    token = _active.set(_active.get() + (seen,))
    try:
        yield seen
    finally:
        _active.reset(token)


@contextmanager
def unrecorded() -> Iterator[None]:
    """Notes within the block go to no recording: a check that runs a path the job itself may not run."""
    token = _active.set(())
    try:
        yield
    finally:
        _active.reset(token)


def note(site: str, impl: str, fallback: str | None = None) -> None:
    """One use of `impl` at `site`. `fallback`: why this is slower than the fast path expected here and by how
    much, logged the first time within the innermost recording (nothing outside a recording)."""
    stack = _active.get()
    if stack and fallback and impl not in stack[-1][site]:
        log.warning("%s", fallback)
    for seen in stack:
        seen[site][impl] += 1


def ran(site: str) -> str | None:
    """The implementation(s) the innermost recording saw at `site` ("a+b" if several), None if it never ran."""
    stack = _active.get()
    impls = sorted(stack[-1][site]) if stack and site in stack[-1] else []
    return "+".join(impls) or None


class StageTimer:
    """Wall-clock seconds per stage (synchronizing CUDA so asynchronous work is charged to its stage)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        import torch  # loaded by then: this module is imported before torch may be

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
