"""Every bad input named in the op contract gets a ValueError/TypeError naming the argument."""

import math

import pytest
import torch

import dymu_kernels as dk

B, N, C, D = 2, 9, 8, 6


def metric():
    return torch.randn(B, N, C)


def lengths(*vals):
    return torch.tensor(vals or [N, 5], dtype=torch.int32)


def nm():
    return dk.bipartite_similarity(metric())


def vtu_args(**over):
    args = dict(
        q=torch.randn(1, 4, 3, 8), k=torch.randn(1, 2, 3, 8), v=torch.randn(1, 2, 3, 8),
        cos=torch.randn(7, 8), sin=torch.randn(7, 8), pos_map=torch.tensor([[0, 0, 1, 1, 2]], dtype=torch.int32),
    )
    args.update(over)
    return args


def call_vtu(**over):
    a = vtu_args(**over)
    full_lengths = a.pop("full_lengths", None)
    return dk.vtu_attention(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["pos_map"], full_lengths=full_lengths)


BAD = {
    "metric not a tensor": (lambda: dk.bipartite_similarity([[1.0]]), TypeError, "metric"),
    "metric 2-D": (lambda: dk.bipartite_similarity(torch.randn(N, C)), ValueError, "metric"),
    "metric int": (lambda: dk.bipartite_similarity(torch.ones(B, N, C, dtype=torch.int32)), TypeError, "metric"),
    "metric float64": (lambda: dk.bipartite_similarity(torch.randn(B, N, C, dtype=torch.float64)), TypeError, "metric"),
    "metric C > 128": (lambda: dk.bipartite_similarity(torch.randn(B, N, 129)), ValueError, "metric dim"),
    "metric N = 0": (lambda: dk.bipartite_similarity(torch.randn(B, 0, C)), ValueError, "N >= 1"),
    "lengths float": (lambda: dk.bipartite_similarity(metric(), torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    "lengths wrong batch": (lambda: dk.bipartite_similarity(metric(), lengths(3)), ValueError, "lengths"),
    "lengths > N": (lambda: dk.bipartite_similarity(metric(), lengths(N + 1, 2)), ValueError, "lengths"),
    "lengths < 0": (lambda: dk.bipartite_similarity(metric(), lengths(-1, 2)), ValueError, "lengths"),
    "threshold NaN": (lambda: dk.select_edges(*nm(), lengths(), math.nan, N), ValueError, "NaN"),
    "threshold NaN tensor": (lambda: dk.select_edges(*nm(), lengths(), torch.tensor([0.1, math.nan]), N), ValueError, "NaN"),
    "threshold wrong shape": (lambda: dk.select_edges(*nm(), lengths(), torch.zeros(3), N), ValueError, "threshold"),
    "threshold string": (lambda: dk.select_edges(*nm(), lengths(), "0.5", N), TypeError, "threshold"),
    "num_rows mismatch": (lambda: dk.select_edges(*nm(), lengths(), 0.5, N + 2), ValueError, "node_max"),
    "num_rows zero": (lambda: dk.select_edges(*nm(), lengths(), 0.5, 0), ValueError, "num_rows"),
    "node_idx out of range": (
        lambda: dk.select_edges(nm()[0], torch.full((B, 5), 99, dtype=torch.int32), lengths(), 0.5, N), ValueError, "node_idx"),
    "node_max float16": (lambda: dk.select_edges(nm()[0].half(), nm()[1], lengths(), 0.5, N), TypeError, "node_max"),
    "scatter row_map shape": (
        lambda: dk.scatter_merge(torch.randn(B, N, D), torch.ones(B, N), torch.zeros(B, N - 1, dtype=torch.int32), lengths()),
        ValueError, "row_map"),
    "scatter row_map beyond new_lengths": (
        lambda: dk.scatter_merge(torch.randn(B, N, D), torch.ones(B, N), torch.full((B, N), 4, dtype=torch.int32), lengths(2, 2)),
        ValueError, "row_map"),
    "scatter size int": (
        lambda: dk.scatter_merge(torch.randn(B, N, D), torch.ones(B, N, dtype=torch.int64), torch.zeros(B, N, dtype=torch.int32), lengths()),
        TypeError, "size"),
    "merge metric batch mismatch": (
        lambda: dk.dtome_merge(torch.randn(B, N, D), torch.randn(B + 1, N, C), None, None, 0.5), ValueError, "metric"),
    "merge pos_map out of range": (
        lambda: dk.dtome_merge(torch.randn(B, N, D), metric(), None, None, 0.5, pos_map=torch.full((B, 20), N, dtype=torch.int32)),
        ValueError, "pos_map"),
    "merge pos_map batch": (
        lambda: dk.dtome_merge(torch.randn(B, N, D), metric(), None, None, 0.5, pos_map=torch.zeros(1, 20, dtype=torch.int32)),
        ValueError, "pos_map"),
    "batch_threshold negative r": (lambda: dk.batch_threshold(nm()[0], -1), ValueError, "r must"),
    "batch_threshold NaN score": (lambda: dk.batch_threshold(torch.tensor([[0.5, math.nan]]), 1), ValueError, "NaN"),
    "batch_threshold float r": (lambda: dk.batch_threshold(nm()[0], 1.5), ValueError, "r must"),
    "vtu Hq not multiple of Hkv": (lambda: call_vtu(k=torch.randn(1, 3, 3, 8), v=torch.randn(1, 3, 3, 8)), ValueError, "multiple"),
    "vtu odd D": (lambda: call_vtu(q=torch.randn(1, 4, 3, 7), k=torch.randn(1, 2, 3, 7), v=torch.randn(1, 2, 3, 7),
                                   cos=torch.randn(7, 7), sin=torch.randn(7, 7)), ValueError, "even"),
    "vtu D > 128": (lambda: call_vtu(q=torch.randn(1, 4, 3, 130), k=torch.randn(1, 2, 3, 130), v=torch.randn(1, 2, 3, 130),
                                     cos=torch.randn(7, 130), sin=torch.randn(7, 130)), ValueError, "head dim"),
    "vtu map out of range": (lambda: call_vtu(pos_map=torch.tensor([[0, 0, 1, 1, 3]], dtype=torch.int32)), ValueError, "pos_map"),
    "vtu map negative": (lambda: call_vtu(pos_map=torch.tensor([[0, -1, 1, 1, 2]], dtype=torch.int32)), ValueError, "pos_map"),
    "vtu map float": (lambda: call_vtu(pos_map=torch.tensor([[0.0, 1.0]])), TypeError, "pos_map"),
    "vtu cos shorter than map": (lambda: call_vtu(cos=torch.randn(4, 8), sin=torch.randn(4, 8)), ValueError, "fewer"),
    "vtu cos wrong width": (lambda: call_vtu(cos=torch.randn(7, 6), sin=torch.randn(7, 6)), ValueError, "cos"),
    "vtu cos/sin mismatch": (lambda: call_vtu(sin=torch.randn(8, 8)), ValueError, "same shape"),
    "vtu dtype mismatch": (lambda: call_vtu(k=torch.randn(1, 2, 3, 8).half()), TypeError, "dtype"),
    "vtu float64": (lambda: call_vtu(q=torch.randn(1, 4, 3, 8).double()), TypeError, "q"),
    "vtu batch mismatch": (lambda: call_vtu(k=torch.randn(2, 2, 3, 8), v=torch.randn(2, 2, 3, 8)), ValueError, "k/v"),
    "vtu k v shapes differ": (lambda: call_vtu(v=torch.randn(1, 2, 4, 8)), ValueError, "same shape"),
    "vtu full_lengths > Nf": (lambda: call_vtu(full_lengths=torch.tensor([6], dtype=torch.int32)), ValueError, "full_lengths"),
    "vtu cos wrong batch": (lambda: call_vtu(cos=torch.randn(2, 7, 8), sin=torch.randn(2, 7, 8)), ValueError, "batch"),
    "vtu map on meta device": (lambda: call_vtu(pos_map=torch.zeros(1, 5, dtype=torch.int32, device="meta")), ValueError, "pos_map is on meta"),
    "unknown backend": (lambda: dk.bipartite_similarity(metric(), backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clear_error(name):
    fn, exc, fragment = BAD[name]
    with pytest.raises(exc, match=fragment):
        fn()


def test_unimplemented_backend_says_why():
    # An explicit backend that cannot run the op must raise, never fall back silently.
    from dymu_kernels._backends import implements

    for backend in ("native", "triton"):
        if implements(backend, "vtu_attention") and backend == "native":
            continue
        if backend == "triton" and implements("triton", "vtu_attention"):
            continue
        with pytest.raises(dk.BackendUnavailable, match=backend):
            call_vtu_backend = vtu_args()
            dk.vtu_attention(*call_vtu_backend.values(), backend=backend)


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("DYMU_BACKEND", "reference")
    out = dk.bipartite_similarity(metric())
    assert out[0].shape == (B, 5)
    monkeypatch.setenv("DYMU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        dk.bipartite_similarity(metric())
