"""Packed variable-length DToMe (issue 12): images concatenated row-wise with ``cu_seqlens``.

``reference`` (pure PyTorch, the spec), ``native`` (csrc/varlen_cpu.cpp, both ops), ``triton``
(the attention only; the varlen merge has no Triton kernel yet). The public wrappers
are ``dk.dtome_merge_varlen`` and ``dk.proportional_attention_varlen`` in ``dymu_kernels.api``.
"""
