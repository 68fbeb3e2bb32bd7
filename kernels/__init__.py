"""Triton kernels with their autograd wrappers and plain-PyTorch references; installed as tokdistill_fast.kernels.

Run from a checkout (`python -m ...`, `python -m pytest`), the repository root is on sys.path, where this folder
would shadow Hugging Face's `kernels` package, which transformers 5.25 imports: imported under that name, it loads
the installed package in its place. Where none is installed it stays this empty module, without a version, which
transformers' availability check reads as not available (older transformers import it to look for one)."""

if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec(__name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
