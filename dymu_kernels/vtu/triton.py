"""Triton backend of the vtu ops.

Not implemented yet: the kernels are tracked by their issue. ``SUPPORTED`` lists the ops this
module implements; ``COMPILE_SPECS`` lists the kernels (with signatures and real block sizes)
that ``python -m dymu_kernels.compile_check`` compiles for cuda 90 and 80.
"""

SUPPORTED = frozenset()
COMPILE_SPECS = []
