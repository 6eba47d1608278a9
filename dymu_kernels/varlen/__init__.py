"""Packed variable-length DToMe (issue 12): images concatenated row-wise with ``cu_seqlens``.

``reference`` (pure PyTorch, the spec), ``native`` (csrc/varlen_cpu.cpp, both ops), ``triton``
(a varlen attention kernel; the merge runs the padded Triton DToMe kernels on a [B, max_seqlen]
gather of the packed rows). The public wrappers
are ``dk.dtome_merge_varlen`` and ``dk.proportional_attention_varlen`` in ``dymu_kernels.api``.
"""
