"""VTU decode op family: causal RoPE attention of new queries over a merged KV cache, where
each cached full position reads its unrotated K/V row through a map and is rotated at its own
position on the fly (issue 11). No re-merge: one output row per query.

- ``reference.py``: pure PyTorch, any device, the executable spec.
- ``native.py``: binding to the C++/OpenMP kernel ``torch.ops.dymu.native_vtu_decode_attention``.
- ``triton.py``: flash-decoding Triton kernel (split positions + deterministic combine).
"""
