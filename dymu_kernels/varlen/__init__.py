"""Packed variable-length DToMe (issue 12): images concatenated row-wise with ``cu_seqlens``.

``reference`` (pure PyTorch, the spec), ``native`` (csrc/varlen_cpu.cpp, both ops), ``triton``
(a varlen attention kernel; the merge runs the DToMe kernels in their PACKED mode straight on the
packed rows, with no padded [B, max_seqlen] copy). The public wrappers
are ``dk.dtome_merge_varlen`` and ``dk.proportional_attention_varlen`` in ``dymu_kernels.api``.
"""
