"""Triton kernels of spinal_ops (installed as ``spinal_ops.triton_kernels``)."""
