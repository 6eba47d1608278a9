"""torch.library registration of the public ops, so torch.compile traces them whole.

Every public op is one functional custom op ``torch.ops.dymu.<op>(str backend, ...)``: the
backend is chosen in Python (``_backends.select``) *before* the call and passed as the first
argument, the op runs ``dymu_kernels.<family>.<backend>.<op>`` under ``torch.no_grad()`` and
returns fresh tensors (outputs never alias inputs). A fake kernel gives the real shapes and
dtypes, so the ops run under FakeTensorMode, torch.compile (``fullgraph=True``) and
``torch.library.opcheck`` without reading data.

Adding an op is one entry in ``SPECS``::

    "my_op": OpSpec("my_op(str backend, Tensor x, SymInt n) -> (Tensor, Tensor)", fake=_my_fake)

plus its family in ``_backends.FAMILIES``; the wrapper in ``api.py`` keeps calling
``_run("my_op", device, backend, *args)``. ``fake=None`` runs the reference implementation on
the fake tensors (fine when its output shapes do not depend on data). The backend functions
must return a Tensor or a tuple of Tensors; ``unpack`` turns the op's tuple back into what the
public wrapper returns (``pack`` maps the backend's result to the schema's tuple, e.g. a
``None`` output to an empty tensor, since schemas here return plain Tensors only).
"""

from typing import Callable, Dict, NamedTuple, Optional

import torch

from . import _backends

NAMESPACE = "dymu"


class OpSpec(NamedTuple):
    schema: str  # "name(str backend, ...) -> ...": the first argument is always the backend
    fake: Optional[Callable] = None  # (*args without backend) -> outputs; None: the reference
    pack: Optional[Callable] = None  # (backend result, args) -> tuple of tensors for the schema
    unpack: Optional[Callable] = None  # (op outputs, args) -> what the public wrapper returns


# ----------------------------------------------------------------------------- fake kernels


def _fake_similarity(metric, lengths, protect_first):
    bsz, n, _ = metric.shape
    shape = (bsz, (n + 1) // 2)
    return metric.new_empty(shape, dtype=torch.float32), metric.new_empty(shape, dtype=torch.int32)


def _fake_select(node_max, node_idx, lengths, threshold, num_rows, protect_first):
    bsz = node_max.shape[0]
    return node_max.new_empty((bsz, num_rows), dtype=torch.int32), node_max.new_empty((bsz,), dtype=torch.int32)


def _fake_scatter(x, size, row_map, new_lengths):
    bsz, n, d = x.shape
    return x.new_empty((bsz, n, d)), x.new_empty((bsz, n), dtype=torch.float32)


def _fake_merge(x, metric, size, lengths, threshold, pos_map, protect_first):
    bsz, n, d = x.shape
    n0 = pos_map.shape[1] if pos_map is not None else 0
    return (
        x.new_empty((bsz, n, d)),
        x.new_empty((bsz, n), dtype=torch.float32),
        x.new_empty((bsz,), dtype=torch.int32),
        x.new_empty((bsz, n0), dtype=torch.int32),
        x.new_empty((bsz, n), dtype=torch.int32),
    )


def _fake_batch_threshold(node_max, r):
    return node_max.new_empty((), dtype=torch.float32)


def _fake_vtu(q, k, v, cos, sin, pos_map, full_lengths, causal, scale):
    return q.new_empty(q.shape)


def _fake_decode(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, scale):
    return q.new_empty(q.shape)


def _fake_merge_varlen(x, metric, size, cu_seqlens, threshold, pos_map, protect_first, max_seqlen):
    num_rows, d = x.shape
    pos_shape = tuple(pos_map.shape) if pos_map is not None else (0,)
    return (
        x.new_empty((num_rows, d)),
        x.new_empty((num_rows,), dtype=torch.float32),
        x.new_empty(tuple(cu_seqlens.shape), dtype=torch.int32),
        x.new_empty(pos_shape, dtype=torch.int32),
        x.new_empty((num_rows,), dtype=torch.int32),
    )


def _fake_attention_varlen(q, k, v, size, cu_seqlens, scale, max_seqlen):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- pack / unpack


def _pack_merge(res, args):
    pos = res.pos_map
    if pos is None:  # schemas return plain Tensors: an empty [B, 0] stands for None
        pos = res.x.new_empty((res.x.shape[0], 0), dtype=torch.int32)
    return (res.x, res.size, res.lengths, pos, res.row_map)


def _unpack_merge(out, args):
    from .dtome.reference import DToMeResult

    x, size, lengths, pos, row_map = out
    return DToMeResult(x, size, lengths, pos if args[5] is not None else None, row_map)


def _pack_merge_varlen(res, args):
    pos = res.pos_map
    if pos is None:  # an empty [0] stands for None (see _pack_merge)
        pos = res.x.new_empty((0,), dtype=torch.int32)
    return (res.x, res.size, res.cu_seqlens, pos, res.row_map)


def _unpack_merge_varlen(out, args):
    from .varlen.reference import DToMeVarlenResult

    x, size, cu_seqlens, pos, row_map = out
    return DToMeVarlenResult(x, size, cu_seqlens, pos if args[5] is not None else None, row_map)


SPECS: Dict[str, OpSpec] = {
    "bipartite_similarity": OpSpec(
        "bipartite_similarity(str backend, Tensor metric, Tensor lengths, bool protect_first) -> (Tensor, Tensor)",
        fake=_fake_similarity,
    ),
    "select_edges": OpSpec(
        "select_edges(str backend, Tensor node_max, Tensor node_idx, Tensor lengths, Tensor threshold, "
        "SymInt num_rows, bool protect_first) -> (Tensor, Tensor)",
        fake=_fake_select,
    ),
    "scatter_merge": OpSpec(
        "scatter_merge(str backend, Tensor x, Tensor size, Tensor row_map, Tensor new_lengths) -> (Tensor, Tensor)",
        fake=_fake_scatter,
    ),
    "dtome_merge": OpSpec(
        "dtome_merge(str backend, Tensor x, Tensor metric, Tensor size, Tensor lengths, Tensor threshold, "
        "Tensor? pos_map, bool protect_first) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=_fake_merge,
        pack=_pack_merge,
        unpack=_unpack_merge,
    ),
    "batch_threshold": OpSpec("batch_threshold(str backend, Tensor node_max, SymInt r) -> Tensor", fake=_fake_batch_threshold),
    "vtu_attention": OpSpec(
        "vtu_attention(str backend, Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos_map, "
        "Tensor full_lengths, bool causal, float scale) -> Tensor",
        fake=_fake_vtu,
    ),
    "vtu_decode_attention": OpSpec(
        "vtu_decode_attention(str backend, Tensor q, Tensor k_rows, Tensor v_rows, Tensor cos, Tensor sin, "
        "Tensor pos_map, Tensor q_positions, Tensor full_lengths, float scale) -> Tensor",
        fake=_fake_decode,
    ),
    "dtome_merge_varlen": OpSpec(
        "dtome_merge_varlen(str backend, Tensor x, Tensor metric, Tensor size, Tensor cu_seqlens, Tensor threshold, "
        "Tensor? pos_map, bool protect_first, SymInt max_seqlen) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=_fake_merge_varlen,
        pack=_pack_merge_varlen,
        unpack=_unpack_merge_varlen,
    ),
    "proportional_attention_varlen": OpSpec(
        "proportional_attention_varlen(str backend, Tensor q, Tensor k, Tensor v, Tensor size, Tensor cu_seqlens, "
        "float scale, SymInt max_seqlen) -> Tensor",
        fake=_fake_attention_varlen,
    ),
}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_REGISTERED: Dict[str, OpSpec] = {}


def _fresh(out, args):
    """Clone any output that shares memory with an input (custom ops must not alias)."""
    ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel()}
    if isinstance(out, torch.Tensor):
        return out.clone() if out.numel() and out.untyped_storage().data_ptr() in ptrs else out
    return tuple(_fresh(o, args) for o in out)


def _make_impl(name: str, spec: OpSpec):
    def impl(backend: str, *args):
        fn = getattr(_backends.module(backend, _backends.FAMILIES[name]), name)
        with torch.no_grad():
            out = fn(*args)
        if spec.pack is not None:
            out = spec.pack(out, args)
        return _fresh(tuple(out) if isinstance(out, (tuple, list)) else out, args)

    return impl


def _make_fake(name: str, spec: OpSpec):
    def fake(backend: str, *args):
        if spec.fake is not None:
            return spec.fake(*args)
        out = getattr(_backends.module("reference", _backends.FAMILIES[name]), name)(*args)
        if spec.pack is not None:
            out = spec.pack(out, args)
        return tuple(out) if isinstance(out, (tuple, list)) else out

    return fake


def register(name: str, spec: OpSpec) -> None:
    """Define ``dymu::<name>`` from ``spec`` with one implementation for every device and a fake."""
    if name in _REGISTERED:
        return
    _LIB.define(spec.schema)
    _LIB.impl(name, _make_impl(name, spec), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", _make_fake(name, spec), lib=_LIB)
    _REGISTERED[name] = spec


def registered(name: str) -> bool:
    return name in _REGISTERED


def op(name: str):
    """The OpOverload ``torch.ops.dymu.<name>.default`` (for opcheck and tests)."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def call(name: str, backend: str, *args):
    """Run the registered op on ``backend``; returns what the public wrapper returns."""
    spec = _REGISTERED[name]
    out = op(name)(backend, *args)
    return spec.unpack(out, args) if spec.unpack is not None else out


for _name, _spec in SPECS.items():
    register(_name, _spec)
