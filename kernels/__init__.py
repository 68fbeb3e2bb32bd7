"""Triton kernels with their autograd wrappers and plain-PyTorch references; installed as tokdistill_fast.kernels."""
