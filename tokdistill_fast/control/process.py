"""Process-wide settings the command line applies once, at its start: how glibc's malloc keeps freed memory, and
which of MKL's code paths runs fp32 matrix products on x86 CPUs that are not Intel's; and how it ends (exit_now).
All are the process's to set, so a library call (`tokdistill_fast.distill` in a user's program) leaves them alone."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import sys

from ..config import env_flag

# glibc's malloc hands large freed blocks back to the OS and maps fresh zeroed pages for the next ones: a process that
# loads SmolLM2 and runs the 40-word teacher pass three times took 1.66M page faults; keeping up to 1 GiB of freed
# memory for reuse, 0.22M and 10% less time (docs/defaults.md, "Freed memory kept for reuse").
KEEP_FREED = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

MKL_SHIM = "tokdistill_fast._mkl_dispatch"  # built from csrc/mkl_dispatch.cpp
MKL_OWN_DISPATCH = "TOKDISTILL_MKL_OWN_DISPATCH"  # 1: leave MKL's vendor check as it is
BY_INSTRUCTION_SETS = "by instruction sets"

_mkl_dispatch = "not set by this process"  # what use_mkl_by_instruction_sets did (mkl_dispatch() reports it)


def keep_freed_memory(libc=None) -> bool:
    """Make this process's glibc malloc keep freed blocks up to KEEP_FREED instead of unmapping them. The mmap
    threshold first and the trim threshold only if it took: a fixed trim threshold alone turns off glibc's adaptive
    mmap threshold, and the same pass then took 8x the page faults. False without glibc."""
    if libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


def use_mkl_by_instruction_sets() -> bool:
    """Load csrc/mkl_dispatch.cpp's library into the global symbol scope before torch loads, so that MKL's
    vendor check binds to it and MKL picks its kernels by the CPU's instruction sets on every x86 CPU. On a 2-core
    AMD EPYC (AVX2) its fp32 matrix products at the student's shapes ran 15-20% faster and the 40-word job took
    0.90x the time (docs/cpu-speed.md, "MKL's vendor check"); on Intel CPUs nothing changes. False, with nothing
    done, once torch is loaded (libtorch has bound the check then), off Linux x86-64, without the built library
    or with TOKDISTILL_MKL_OWN_DISPATCH=1."""
    global _mkl_dispatch
    if _mkl_dispatch.startswith(BY_INSTRUCTION_SETS):  # an entry point before this one did it (the demo's)
        return True
    if env_flag(MKL_OWN_DISPATCH):
        reason = f"{MKL_OWN_DISPATCH}=1"
    elif "torch" in sys.modules:
        reason = "torch was loaded first"
    elif sys.platform != "linux" or platform.machine() != "x86_64":
        reason = "not Linux x86-64"
    elif (spec := importlib.util.find_spec(MKL_SHIM)) is None or not spec.origin:
        reason = "csrc/mkl_dispatch.cpp not built"
    else:
        try:
            ctypes.CDLL(spec.origin, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            reason = f"cannot load it: {e}"
        else:
            _mkl_dispatch = f"{BY_INSTRUCTION_SETS} (csrc/mkl_dispatch.cpp)"
            return True
    _mkl_dispatch = f"MKL's own ({reason})"
    return False


def mkl_dispatch() -> str:
    """How MKL picks its kernels in this process, for report.json and `env_report`."""
    return _mkl_dispatch


def exit_now(code: int) -> None:
    """End the process with `code` once its logs and standard streams are flushed, without the interpreter's
    teardown (freeing a loaded model's tensors and modules one by one): about 1.0 s of the 40-word fp32 job's 42 s
    (docs/cpu-speed.md, "The end of the process"). The command line's outputs are written and renamed into place
    before its main() returns, so nothing is left to flush but these."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
