"""VTU op family: RoPE-rotated attention of the full, unmerged sequence computed from merged
Q/K/V and a position map, re-merged into merged rows (README, Semantics: VTU).

- ``reference.py``: pure PyTorch, any device, the executable spec.
- ``triton.py``: FlashAttention-2-style Triton kernel (CUDA; CPU under TRITON_INTERPRET=1).
- ``native.py``: binding to the C++ kernel in ``csrc/`` (``torch.ops.dymu.native_vtu_attention``).
"""
