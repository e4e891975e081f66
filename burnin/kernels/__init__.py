"""Triton kernels used by the workload and by faults."""
