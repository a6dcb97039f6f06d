"""Process groups, device selection and the CPU compatibility layer for Megatron-Core."""

from mcore_r1.parallel.dims import LayoutError, ParallelDims

__all__ = ["LayoutError", "ParallelDims"]
