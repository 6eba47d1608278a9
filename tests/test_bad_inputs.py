"""One answer to bad or unusual input on every backend (issue 13, ops part).

One table, ``CASES``: every entry is (input + op, expected), where expected is either
``Raises(exception type, message fragment)`` or ``Same(fn)``: the op's result equals what
``fn`` computes (independently of the backend under test). Every entry runs on every backend
that runs here (reference, native, triton under the interpreter), so a backend that answers
differently fails. Plus Hypothesis properties: random inputs with random NaN in padded or
masked positions give exactly the result of zeros there.

The README's Semantics section states the rules tested here (NaN, masking, gradient, ties).
"""

import math
import warnings
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dymu_kernels as dk
from dymu_kernels import _validate
from conftest import backend_params
from dymu_kernels._backends import triton_interpreting

B, N, C, D = 2, 9, 8, 6
INF, NAN = math.inf, math.nan


class Raises(NamedTuple):
    exc: type
    fragment: str


class Same(NamedTuple):
    expected: Callable  # () -> the result every backend must return (compared exactly)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def metric(seed=0):
    return torch.randn(B, N, C, generator=_g(seed))


def lengths(*vals):
    return torch.tensor(vals or [N, 5], dtype=torch.int32)


def nm(seed=0):
    return dk.bipartite_similarity(metric(seed), backend="reference")


def vtu_args(**over):
    g = _g(1)
    args = dict(
        q=torch.randn(1, 4, 3, 8, generator=g), k=torch.randn(1, 2, 3, 8, generator=g),
        v=torch.randn(1, 2, 3, 8, generator=g), cos=torch.randn(7, 8, generator=g), sin=torch.randn(7, 8, generator=g),
        pos_map=torch.tensor([[0, 0, 1, 1, 2]], dtype=torch.int32),
    )
    args.update(over)
    return args


def vtu(be, **over):
    a = vtu_args(**over)
    kw = {name: a.pop(name) for name in ("full_lengths", "causal", "scale") if name in a}
    return dk.vtu_attention(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["pos_map"], backend=be, **kw)


def with_rows(t, rows, value, dim=1):
    """A copy of t with the given rows (along dim) set to value."""
    out = t.clone()
    out.index_fill_(dim, torch.tensor(rows), value)
    return out


def merge(be, x=None, m=None, size=None, lens=None, tau=0.2, **kw):
    x = torch.randn(B, N, D, generator=_g(2)) if x is None else x
    return dk.dtome_merge(x, metric() if m is None else m, size, lens, tau, backend=be, **kw)


# --------------------------------------------------------------------------- expected results


def _similarity_expected(m, skip_src=(), skip_dst=()):
    """A plain restatement of bipartite_similarity without lengths: the source rows skip_src and
    destination rows skip_dst (rows holding NaN/inf) form no edge."""
    mn = torch.nn.functional.normalize(m.float(), dim=-1, eps=1e-12)
    scores = mn[:, 0::2] @ mn[:, 1::2].transpose(1, 2)
    for row in skip_src:
        scores[:, row // 2] = -INF
    for row in skip_dst:
        scores[:, :, row // 2] = -INF
    node_max = scores.amax(-1)
    node_idx = torch.where(node_max > -INF, 2 * scores.argmax(-1) + 1, -1).to(torch.int32)
    return node_max, node_idx


def _select_inputs():
    lens = lengths(N, 5)
    node_max, node_idx = dk.bipartite_similarity(metric(), lens, protect_first=True, backend="reference")
    return node_max, node_idx, lens


def _select_inconsistent():
    node_max, node_idx, lens = _select_inputs()
    node_max, node_idx = node_max.clone(), node_idx.clone()
    # Finite scores at the protected row 0 and at padding sources (rows >= 5 of image 1),
    # and an edge to a padding destination: all must be ignored.
    node_max[:, 0], node_idx[:, 0] = 0.99, 1
    node_max[1, 3:], node_idx[1, 3:] = 0.99, 1
    node_max[1, 1], node_idx[1, 1] = 0.98, 7
    return node_max, node_idx, lens


def _select_consistent():
    node_max, node_idx, lens = _select_inputs()
    node_max = node_max.clone()
    node_max[1, 1] = -INF
    return dk.select_edges(node_max, node_idx, lens, 0.1, N, protect_first=True, backend="reference")


def _vtu_zero(rows, **over):
    """VTU with merged rows `rows` of K and V set to 0 instead of NaN (reference backend)."""
    a = vtu_args(**over)
    a["k"], a["v"] = with_rows(a["k"], rows, 0.0, dim=2), with_rows(a["v"], rows, 0.0, dim=2)
    return vtu("reference", **a)


CASES = {
    # ---- shapes, dtypes, devices (the contract's bad inputs)
    "metric not a tensor": (lambda be: dk.bipartite_similarity([[1.0]], backend=be), Raises(TypeError, "metric")),
    "metric 2-D": (lambda be: dk.bipartite_similarity(torch.randn(N, C), backend=be), Raises(ValueError, "metric")),
    "metric int": (lambda be: dk.bipartite_similarity(torch.ones(B, N, C, dtype=torch.int32), backend=be), Raises(TypeError, "metric")),
    "metric float64": (lambda be: dk.bipartite_similarity(metric().double(), backend=be), Raises(TypeError, "metric")),
    "metric C > 128": (lambda be: dk.bipartite_similarity(torch.randn(B, N, 129), backend=be), Raises(ValueError, "metric dim")),
    "metric N = 0": (lambda be: dk.bipartite_similarity(torch.randn(B, 0, C), backend=be), Raises(ValueError, "N >= 1")),
    "lengths float": (lambda be: dk.bipartite_similarity(metric(), torch.tensor([1.0, 2.0]), backend=be), Raises(TypeError, "lengths")),
    "lengths wrong batch": (lambda be: dk.bipartite_similarity(metric(), lengths(3), backend=be), Raises(ValueError, "lengths")),
    "lengths > N": (lambda be: dk.bipartite_similarity(metric(), lengths(N + 1, 2), backend=be), Raises(ValueError, "lengths")),
    "lengths < 0": (lambda be: dk.bipartite_similarity(metric(), lengths(-1, 2), backend=be), Raises(ValueError, "lengths")),
    "protect_first string": (
        lambda be: dk.bipartite_similarity(metric(), protect_first="no", backend=be), Raises(TypeError, "protect_first must be a bool")),
    "protect_first int": (
        lambda be: merge(be, protect_first=1), Raises(TypeError, "protect_first must be a bool")),
    "select protect_first string": (
        lambda be: dk.select_edges(*nm(), lengths(), 0.5, N, protect_first="yes", backend=be), Raises(TypeError, "protect_first")),
    "threshold NaN": (lambda be: dk.select_edges(*nm(), lengths(), NAN, N, backend=be), Raises(ValueError, "NaN")),
    "threshold NaN tensor": (
        lambda be: dk.select_edges(*nm(), lengths(), torch.tensor([0.1, NAN]), N, backend=be), Raises(ValueError, "NaN")),
    "threshold NumPy NaN": (lambda be: merge(be, tau=np.float32("nan")), Raises(ValueError, "NaN")),
    "threshold wrong shape": (lambda be: dk.select_edges(*nm(), lengths(), torch.zeros(3), N, backend=be), Raises(ValueError, "threshold")),
    "threshold string": (lambda be: dk.select_edges(*nm(), lengths(), "0.5", N, backend=be), Raises(TypeError, "threshold")),
    "threshold bool": (lambda be: merge(be, tau=True), Raises(TypeError, "threshold")),
    "threshold int tensor": (lambda be: merge(be, tau=torch.tensor(1)), Raises(TypeError, "threshold")),
    "num_rows mismatch": (lambda be: dk.select_edges(*nm(), lengths(), 0.5, N + 2, backend=be), Raises(ValueError, "node_max")),
    "num_rows zero": (lambda be: dk.select_edges(*nm(), lengths(), 0.5, 0, backend=be), Raises(ValueError, "num_rows")),
    "node_idx out of range": (
        lambda be: dk.select_edges(nm()[0], torch.full((B, 5), 99, dtype=torch.int32), lengths(), 0.5, N, backend=be),
        Raises(ValueError, "node_idx")),
    "node_max float16": (lambda be: dk.select_edges(nm()[0].half(), nm()[1], lengths(), 0.5, N, backend=be), Raises(TypeError, "node_max")),
    "scatter row_map shape": (
        lambda be: dk.scatter_merge(torch.randn(B, N, D), torch.ones(B, N), torch.zeros(B, N - 1, dtype=torch.int32), lengths(), backend=be),
        Raises(ValueError, "row_map")),
    "scatter row_map beyond new_lengths": (
        lambda be: dk.scatter_merge(torch.randn(B, N, D), torch.ones(B, N), torch.full((B, N), 4, dtype=torch.int32), lengths(2, 2), backend=be),
        Raises(ValueError, "row_map")),
    "scatter size int": (
        lambda be: dk.scatter_merge(torch.randn(B, N, D), torch.ones(B, N, dtype=torch.int64), torch.zeros(B, N, dtype=torch.int32), lengths(), backend=be),
        Raises(TypeError, "size")),
    "merge metric batch mismatch": (lambda be: merge(be, m=torch.randn(B + 1, N, C)), Raises(ValueError, "metric")),
    "merge pos_map out of range": (
        lambda be: merge(be, pos_map=torch.full((B, 20), N, dtype=torch.int32)), Raises(ValueError, "pos_map")),
    "merge pos_map batch": (lambda be: merge(be, pos_map=torch.zeros(1, 20, dtype=torch.int32)), Raises(ValueError, "pos_map")),
    "batch_threshold negative r": (lambda be: dk.batch_threshold(nm()[0], -1, backend=be), Raises(ValueError, "r must")),
    "batch_threshold float r": (lambda be: dk.batch_threshold(nm()[0], 1.5, backend=be), Raises(ValueError, "r must")),
    "batch_threshold r > M": (lambda be: dk.batch_threshold(nm()[0], 6, backend=be), Raises(ValueError, r"r must be an int in \[0, 5\]")),
    "batch_threshold huge r": (lambda be: dk.batch_threshold(nm()[0], 2**62, backend=be), Raises(ValueError, "r must")),
    "vtu Hq not multiple of Hkv": (
        lambda be: vtu(be, k=torch.randn(1, 3, 3, 8), v=torch.randn(1, 3, 3, 8)), Raises(ValueError, "multiple")),
    "vtu odd D": (
        lambda be: vtu(be, q=torch.randn(1, 4, 3, 7), k=torch.randn(1, 2, 3, 7), v=torch.randn(1, 2, 3, 7),
                       cos=torch.randn(7, 7), sin=torch.randn(7, 7)), Raises(ValueError, "even")),
    "vtu D > 128": (
        lambda be: vtu(be, q=torch.randn(1, 4, 3, 130), k=torch.randn(1, 2, 3, 130), v=torch.randn(1, 2, 3, 130),
                       cos=torch.randn(7, 130), sin=torch.randn(7, 130)), Raises(ValueError, "head dim")),
    "vtu map out of range": (lambda be: vtu(be, pos_map=torch.tensor([[0, 0, 1, 1, 3]], dtype=torch.int32)), Raises(ValueError, "pos_map")),
    "vtu map negative": (lambda be: vtu(be, pos_map=torch.tensor([[0, -1, 1, 1, 2]], dtype=torch.int32)), Raises(ValueError, "pos_map")),
    "vtu map float": (lambda be: vtu(be, pos_map=torch.tensor([[0.0, 1.0]])), Raises(TypeError, "pos_map")),
    "vtu cos shorter than map": (lambda be: vtu(be, cos=torch.randn(4, 8), sin=torch.randn(4, 8)), Raises(ValueError, "fewer")),
    "vtu cos wrong width": (lambda be: vtu(be, cos=torch.randn(7, 6), sin=torch.randn(7, 6)), Raises(ValueError, "cos")),
    "vtu cos/sin mismatch": (lambda be: vtu(be, sin=torch.randn(8, 8)), Raises(ValueError, "same shape")),
    "vtu dtype mismatch": (lambda be: vtu(be, k=torch.randn(1, 2, 3, 8).half()), Raises(TypeError, "dtype")),
    "vtu float64": (lambda be: vtu(be, q=torch.randn(1, 4, 3, 8).double()), Raises(TypeError, "q")),
    "vtu batch mismatch": (lambda be: vtu(be, k=torch.randn(2, 2, 3, 8), v=torch.randn(2, 2, 3, 8)), Raises(ValueError, "k/v")),
    "vtu k v shapes differ": (lambda be: vtu(be, v=torch.randn(1, 2, 4, 8)), Raises(ValueError, "same shape")),
    "vtu full_lengths > Nf": (lambda be: vtu(be, full_lengths=torch.tensor([6], dtype=torch.int32)), Raises(ValueError, "full_lengths")),
    "vtu cos wrong batch": (lambda be: vtu(be, cos=torch.randn(2, 7, 8), sin=torch.randn(2, 7, 8)), Raises(ValueError, "batch")),
    "vtu map on meta device": (
        lambda be: vtu(be, pos_map=torch.zeros(1, 5, dtype=torch.int32, device="meta")), Raises(ValueError, "pos_map is on meta")),
    "vtu scale NaN": (lambda be: vtu(be, scale=NAN), Raises(ValueError, "scale must be finite and > 0")),
    "vtu scale inf": (lambda be: vtu(be, scale=INF), Raises(ValueError, "scale must be finite and > 0")),
    "vtu scale zero": (lambda be: vtu(be, scale=0.0), Raises(ValueError, "scale must be finite and > 0")),
    "vtu scale negative": (lambda be: vtu(be, scale=-0.1), Raises(ValueError, "scale must be finite and > 0")),
    "vtu scale string": (lambda be: vtu(be, scale="0.1"), Raises(TypeError, "scale")),
    "vtu causal string": (lambda be: vtu(be, causal="no"), Raises(TypeError, "causal must be a bool")),
    # ---- item 1: the NaN rule (a NaN score never forms an edge)
    "NaN in a valid source row": (
        lambda be: dk.bipartite_similarity(with_rows(metric(), [2], NAN), backend=be),
        Same(lambda: _similarity_expected(metric(), skip_src=[2]))),
    "inf in a valid source row": (
        lambda be: dk.bipartite_similarity(with_rows(metric(), [4], -INF), backend=be),
        Same(lambda: _similarity_expected(metric(), skip_src=[4]))),
    "NaN in a valid destination row": (
        lambda be: dk.bipartite_similarity(with_rows(metric(), [3], NAN), backend=be),
        Same(lambda: _similarity_expected(metric(), skip_dst=[3]))),
    "inf in a valid destination row": (
        lambda be: dk.bipartite_similarity(with_rows(metric(), [3], INF), backend=be),
        Same(lambda: _similarity_expected(metric(), skip_dst=[3]))),
    "metric all NaN": (
        lambda be: dk.bipartite_similarity(torch.full((B, N, C), NAN), backend=be),
        Same(lambda: (torch.full((B, 5), -INF), torch.full((B, 5), -1, dtype=torch.int32)))),
    "merge with a NaN source row keeps it": (
        lambda be: (lambda r: (r.lengths, r.row_map[:, 2]))(merge(be, m=with_rows(metric(), [2], NAN), tau=-INF)),
        Same(lambda: (torch.tensor([5, 5], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)))),
    "batch_threshold NaN counts as -inf": (
        lambda be: dk.batch_threshold(torch.tensor([[0.5, NAN, 0.2]]), 1, backend=be), Same(lambda: torch.tensor(0.2))),
    "batch_threshold all NaN": (
        lambda be: dk.batch_threshold(torch.full((2, 3), NAN), 1, backend=be), Same(lambda: torch.tensor(0.0))),
    "select finite node_max with node_idx -1 is no edge": (
        lambda be: dk.select_edges(torch.tensor([[0.5, 0.9]]), torch.tensor([[-1, 3]], dtype=torch.int32), lengths(4), -INF, 4, backend=be),
        Same(lambda: (torch.tensor([[0, 1, 2, 2]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)))),
    "select NaN node_max is no edge": (
        lambda be: dk.select_edges(torch.tensor([[NAN, 0.9]]), torch.tensor([[1, 3]], dtype=torch.int32), lengths(4), -INF, 4, backend=be),
        Same(lambda: (torch.tensor([[0, 1, 2, 2]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)))),
    # ---- item 3: select_edges derives consistency with lengths / protect_first
    "select node_max inconsistent with lengths": (
        lambda be: dk.select_edges(*_select_inconsistent(), 0.1, N, protect_first=True, backend=be), Same(_select_consistent)),
    # ---- item 7: scalars and devices
    "threshold NumPy scalar": (lambda be: merge(be, tau=np.float32(0.3)), Same(lambda: merge("reference", tau=torch.tensor(0.3)))),
    "threshold NumPy float64": (lambda be: merge(be, tau=np.float64(0.3)), Same(lambda: merge("reference", tau=0.3))),
    "threshold Python int": (lambda be: merge(be, tau=0), Same(lambda: merge("reference", tau=0.0))),
    "threshold 0-d tensor": (lambda be: merge(be, tau=torch.tensor(0.3, dtype=torch.float64)), Same(lambda: merge("reference", tau=torch.tensor(0.3)))),
    # ---- item 8: HF rotary layout [1, Nf, D]
    "vtu cos/sin [1, Nf, D] broadcast": (
        lambda be: vtu(be, q=torch.randn(2, 4, 3, 8, generator=_g(3)), k=torch.randn(2, 2, 3, 8, generator=_g(4)),
                       v=torch.randn(2, 2, 3, 8, generator=_g(5)), cos=vtu_args()["cos"][None], sin=vtu_args()["sin"][None],
                       pos_map=torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]], dtype=torch.int32)),
        Same(lambda: vtu("reference", q=torch.randn(2, 4, 3, 8, generator=_g(3)), k=torch.randn(2, 2, 3, 8, generator=_g(4)),
                         v=torch.randn(2, 2, 3, 8, generator=_g(5)),
                         pos_map=torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]], dtype=torch.int32)))),
    # ---- item 2: the masking rule (hidden K/V never reach a query, NaN included)
    "vtu NaN K/V at padded positions": (
        lambda be: vtu(be, k=with_rows(vtu_args()["k"], [2], NAN, dim=2), v=with_rows(vtu_args()["v"], [2], NAN, dim=2),
                       pos_map=torch.tensor([[0, 0, 1, 1, -1]], dtype=torch.int32), full_lengths=torch.tensor([4], dtype=torch.int32),
                       cos=with_rows(vtu_args()["cos"], [4, 5, 6], NAN, dim=0)),
        Same(lambda: _vtu_zero([2], pos_map=torch.tensor([[0, 0, 1, 1, -1]], dtype=torch.int32),
                               full_lengths=torch.tensor([4], dtype=torch.int32)))),
    "vtu NaN K/V causally hidden": (
        # Merged row 2 is only at the last position: rows 0 and 1 never see it; row 2 does.
        lambda be: vtu(be, k=with_rows(vtu_args()["k"], [2], NAN, dim=2), v=with_rows(vtu_args()["v"], [2], NAN, dim=2))[:, :, :2],
        Same(lambda: _vtu_zero([2])[:, :, :2])),
    "vtu NaN V visible propagates": (
        lambda be: vtu(be, v=with_rows(vtu_args()["v"], [0], NAN, dim=2)).isnan().all(),
        Same(lambda: torch.tensor(True))),
}

# Cases that fail on a backend until another engineer's kernel fix is merged: remove the entry
# once it lands.
PENDING: dict = {}  # (backend, case name) -> skip reason, for a fix that has not landed yet


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]


def cpu_backend_params(op):
    """backend_params for CPU tensors: Triton runs them only under TRITON_INTERPRET=1."""
    out = []
    for p in backend_params(op):
        marks = list(p.marks)
        if p.values[0] == "triton" and not triton_interpreting():
            marks.append(pytest.mark.skip(reason="these tables use CPU tensors: Triton runs them only under TRITON_INTERPRET=1"))
        out.append(pytest.param(p.values[0], marks=marks, id=p.id))
    return out


def _backends():
    return [(p.values[0], p.marks) for p in cpu_backend_params("dtome_merge")]


def _params():
    out = []
    for backend, marks in _backends():
        for name in CASES:
            extra = list(marks)
            if (backend, name) in PENDING:
                extra.append(pytest.mark.skip(reason=PENDING[(backend, name)]))
            out.append(pytest.param(backend, name, marks=extra, id=f"{backend}-{name}"))
    return out


@pytest.mark.parametrize("backend, name", _params())
def test_case(backend, name):
    run, expected = CASES[name]
    if isinstance(expected, Raises):
        with pytest.raises(expected.exc, match=expected.fragment):
            run(backend)
        return
    got, want = _flat(run(backend)), _flat(expected.expected())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g, w)
        if g.is_floating_point() and backend != "reference" and g.dtype == torch.float32 and g.dim() and not (g == w).all():
            # Scores may differ by rounding between backends (README, Semantics: ties).
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5, equal_nan=True)
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        dk.bipartite_similarity(metric(), backend="cuda")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("DYMU_BACKEND", "reference")
    out = dk.bipartite_similarity(metric())
    assert out[0].shape == (B, 5)
    monkeypatch.setenv("DYMU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        dk.bipartite_similarity(metric())


# --------------------------------------------------------------------------- item 4: gradients

GRAD_CALLS = {
    "bipartite_similarity": lambda be, m: dk.bipartite_similarity(m, backend=be),
    "dtome_merge": lambda be, m: dk.dtome_merge(torch.randn(B, N, D), m, None, None, 0.2, backend=be),
    "scatter_merge": lambda be, m: dk.scatter_merge(m, torch.ones(B, N), torch.zeros(B, N, dtype=torch.int32), lengths(1, 1), backend=be),
    "select_edges": lambda be, m: dk.select_edges(dk.bipartite_similarity(m.detach())[0].requires_grad_(), nm()[1], None, 0.2, N, backend=be),
    "batch_threshold": lambda be, m: dk.batch_threshold(nm()[0].requires_grad_(), 1, backend=be),
    "vtu_attention": lambda be, m: vtu(be, q=torch.randn(1, 4, 3, 8, requires_grad=True)),
}


@pytest.mark.parametrize("op", list(GRAD_CALLS))
@pytest.mark.parametrize("backend", cpu_backend_params("dtome_merge"))
def test_requires_grad_warns_once_per_op(backend, op):
    _validate._GRAD_WARNED.discard(op)
    m = metric().requires_grad_()
    with pytest.warns(UserWarning, match=r"inference-only.*torch\.no_grad\(\).*inference_mode\(\)"):
        out = GRAD_CALLS[op](backend, m)
    assert not any(t.requires_grad for t in _flat(out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRAD_CALLS[op](backend, m)  # once per op
        _validate._GRAD_WARNED.discard(op)
        with torch.no_grad():
            GRAD_CALLS[op](backend, m)  # no grad mode: no warning


# --------------------------------------------------------------------------- item 7: devices


@pytest.mark.gpu
def test_threshold_on_another_device():
    x, m = torch.randn(B, N, D, device="cuda"), metric().cuda()
    want = dk.dtome_merge(x, m, None, None, 0.3)
    for tau in (torch.tensor(0.3), np.float32(0.3), torch.full((B,), 0.3)):
        got = dk.dtome_merge(x, m, None, None, tau)
        assert torch.equal(got.lengths, want.lengths) and torch.equal(got.row_map, want.row_map)
    cpu = dk.dtome_merge(x.cpu(), m.cpu(), None, None, torch.tensor(0.3, device="cuda"), backend="reference")
    assert torch.equal(cpu.row_map, want.row_map.cpu())


# --------------------------------------------------------------------------- Hypothesis: NaN at padding


def _settings(backend):
    return settings(max_examples=6 if backend == "triton" else 25, deadline=None)


@pytest.mark.parametrize("backend", cpu_backend_params("dtome_merge"))
def test_nan_in_padding_equals_zeros_dtome(backend):
    @_settings(backend)
    @given(
        bsz=st.integers(1, 3), n=st.integers(1, 12), c=st.integers(1, 9), d=st.integers(1, 7),
        seed=st.integers(0, 2**16), protect=st.booleans(), tau=st.sampled_from([-INF, -0.2, 0.0, 0.3, INF]),
    )
    def prop(bsz, n, c, d, seed, protect, tau):
        g = _g(seed)
        lens = torch.randint(0, n + 1, (bsz,), generator=g).to(torch.int32)
        x, m = torch.randn(bsz, n, d, generator=g), torch.randn(bsz, n, c, generator=g)
        size = torch.rand(bsz, n, generator=g) + 0.5
        pos_map = torch.randint(0, n, (bsz, 2 * n), generator=g).to(torch.int32)
        pad = torch.arange(n)[None] >= lens[:, None]
        pad = pad & (torch.rand(bsz, n, generator=g) < 0.7)  # random NaN among the padded rows
        fill = lambda t, v: torch.where(pad.reshape(*pad.shape, *([1] * (t.dim() - 2))), v, t)  # noqa: E731
        zero = dk.dtome_merge(fill(x, 0.0), fill(m, 0.0), fill(size, 0.0), lens, tau, pos_map=pos_map,
                              protect_first=protect, backend=backend)
        nan = dk.dtome_merge(fill(x, NAN), fill(m, NAN), fill(size, NAN), lens, tau, pos_map=pos_map,
                             protect_first=protect, backend=backend)
        for a, b in zip(_flat(zero), _flat(nan)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        sim0 = dk.bipartite_similarity(fill(m, 0.0), lens, protect_first=protect, backend=backend)
        sim1 = dk.bipartite_similarity(fill(m, NAN), lens, protect_first=protect, backend=backend)
        for a, b in zip(sim0, sim1):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # The unfused steps: garbage scores at padding sources change nothing either.
        garbage = torch.where(torch.arange(0, n, 2)[None] >= lens[:, None], 0.99, sim0[0])
        row_map, new_lengths = dk.select_edges(garbage, sim0[1], lens, tau, n, protect_first=protect, backend=backend)
        want = dk.select_edges(*sim0, lens, tau, n, protect_first=protect, backend=backend)
        assert torch.equal(row_map, want[0]) and torch.equal(new_lengths, want[1])
        out0 = dk.scatter_merge(fill(x, 0.0), fill(size, 0.0), row_map, new_lengths, backend=backend)
        out1 = dk.scatter_merge(fill(x, NAN), fill(size, NAN), row_map, new_lengths, backend=backend)
        for a, b in zip(out0, out1):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    prop()


def _vtu_params():
    out = []
    for p in cpu_backend_params("vtu_attention"):
        marks = list(p.marks)
        out.append(pytest.param(p.values[0], marks=marks, id=p.id))
    return out


@pytest.mark.parametrize("backend", _vtu_params())
def test_nan_in_masked_positions_equals_zeros_vtu(backend):
    """NaN at padded positions (cos/sin rows, map -1) and in K/V rows that only hidden positions
    use (padding rows, or rows only later positions use: causally hidden from earlier rows)."""

    @_settings(backend)
    @given(
        bsz=st.integers(1, 2), hkv=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]), nu=st.integers(1, 5),
        extra=st.integers(0, 6), d=st.sampled_from([2, 8]), seed=st.integers(0, 2**16),
    )
    def prop(bsz, hkv, groups, nu, extra, d, seed):
        g = _g(seed)
        nf = nu + extra
        # Sorted maps: merged row r is used by a contiguous run of positions, so a row only
        # later positions use is causally hidden from every earlier row.
        maps = torch.stack([torch.sort(torch.cat([torch.arange(nu), torch.randint(0, nu, (extra,), generator=g)])).values
                            for _ in range(bsz)]).to(torch.int32)
        full = torch.randint(0, nf + 1, (bsz,), generator=g).to(torch.int32)
        q = torch.randn(bsz, hkv * groups, nu, d, generator=g)
        k, v = torch.randn(bsz, hkv, nu, d, generator=g), torch.randn(bsz, hkv, nu, d, generator=g)
        cos, sin = torch.randn(bsz, nf, d, generator=g), torch.randn(bsz, nf, d, generator=g)
        padded = torch.arange(nf)[None] >= full[:, None]
        last_row = torch.where(padded, -1, maps).amax(dim=1)  # last merged row a valid position uses
        hidden_rows = torch.arange(nu)[None] > last_row[:, None]  # [B, Nu]: only padded positions use them
        # The last used row is causally hidden from every other row: NaN there too, but then
        # only rows < last_row are compared.
        nan_rows = hidden_rows | (torch.arange(nu)[None] == last_row[:, None])
        maps_nan = torch.where(padded & (torch.rand(bsz, nf, generator=g) < 0.5), -1, maps)
        r4 = nan_rows[:, None, :, None]
        out0 = dk.vtu_attention(q, torch.where(r4, 0.0, k), torch.where(r4, 0.0, v), torch.where(padded[..., None], 0.0, cos),
                                torch.where(padded[..., None], 0.0, sin), maps, full_lengths=full, backend=backend)
        out1 = dk.vtu_attention(torch.where(hidden_rows[:, None, :, None], NAN, q), torch.where(r4, NAN, k),
                                torch.where(r4, NAN, v), torch.where(padded[..., None], NAN, cos),
                                torch.where(padded[..., None], NAN, sin), maps_nan, full_lengths=full, backend=backend)
        keep = torch.arange(nu)[None] < last_row[:, None]  # rows that never see the NaN rows
        torch.testing.assert_close(out1[keep[:, None].expand_as(out1[..., 0])], out0[keep[:, None].expand_as(out0[..., 0])],
                                   rtol=0, atol=0)
        # Hidden (padding) rows come out as 0 whatever they held.
        assert (out1[hidden_rows[:, None].expand_as(out1[..., 0])] == 0).all()

    prop()
