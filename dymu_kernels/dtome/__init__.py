"""DToMe op family: bipartite similarity, edge selection, scatter-merge, the fused merge step
and batch threshold calibration.

Each backend lives in its own module beside the reference that specifies it:

- ``reference.py``: pure PyTorch, any device, the executable spec (README, Semantics: DToMe).
- ``triton.py``: Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1).
- ``native.py``: bindings to the C++ kernels in ``csrc/`` (``torch.ops.dymu.native_*``).

Backend functions take already validated, normalised arguments (see ``dymu_kernels.api``);
users call the public wrappers in ``dymu_kernels``.
"""
