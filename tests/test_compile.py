"""Every public op traces whole under torch.compile (fullgraph=True) and passes opcheck.

- Each op, on every backend that runs here (reference, native), compiles with fullgraph=True,
  dynamic=False and dynamic=True, equals eager, and does not recompile when only lengths,
  threshold values (as tensors) or map values change.
- torch.library.opcheck passes for every registered ``dymu::<op>`` (schema, fake kernel,
  aot dispatch, static and dynamic).
- DToMeEncoder(..., shrink=False) and vtu_forward compile fullgraph on CPU, equal to eager.
- On CUDA (skipped here): one DToMe step and one VTU call captured in a CUDA graph and
  replayed with new inputs equal eager.
"""

import math

import pytest
import torch

import dymu_kernels as dk
from dymu_kernels import _ops
from conftest import backend_params
from dymu_kernels._backends import triton_interpreting

B, N, C, D, N0 = 3, 11, 8, 16, 20
Hq, Hkv, Nu, Nf, HD = 4, 2, 5, 9, 8

CPU_BACKENDS = [p for p in backend_params("dtome_merge") if p.id != "triton"]
# Triton on CPU tensors under the interpreter (tests only); on a GPU machine see the gpu tests.
INTERPRETED = [p for p in backend_params("dtome_merge") if p.id == "triton" and triton_interpreting()]


class Counting:
    """A torch.compile backend that counts compilations and runs the graph through aot_eager."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)


def _lengths(*vals):
    return torch.tensor(vals, dtype=torch.int32)


def _dtome_case(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    metric = torch.randn(B, N, C, generator=g)
    size = torch.rand(B, N, generator=g) + 0.5
    lengths = torch.randint(0, N + 1, (B,), generator=g).to(torch.int32)
    pos_map = torch.randint(0, N, (B, N0), generator=g).to(torch.int32)
    tau = torch.rand(B, generator=g) * 0.6 - 0.3
    return x, metric, size, lengths, tau, pos_map


def _vtu_case(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nu, HD, generator=g)
    k = torch.randn(B, Hkv, Nu, HD, generator=g)
    v = torch.randn(B, Hkv, Nu, HD, generator=g)
    cos, sin = torch.randn(Nf, HD, generator=g), torch.randn(Nf, HD, generator=g)
    pos_map = torch.randint(0, Nu, (B, Nf), generator=g).to(torch.int32)
    full_lengths = torch.randint(0, Nf + 1, (B,), generator=g).to(torch.int32)
    return q, k, v, cos, sin, pos_map, full_lengths


def _decode_case(seed, tq=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, tq, HD, generator=g)
    k_rows = torch.randn(B, Hkv, Nu, HD, generator=g)
    v_rows = torch.randn(B, Hkv, Nu, HD, generator=g)
    cos, sin = torch.randn(Nf, HD, generator=g), torch.randn(Nf, HD, generator=g)
    pos_map = torch.randint(0, Nu, (B, Nf), generator=g).to(torch.int32)
    q_positions = torch.randint(0, Nf, (B, tq), generator=g).to(torch.int32)
    full_lengths = torch.randint(0, Nf + 1, (B,), generator=g).to(torch.int32)
    return q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths


T = 2 * N  # packed capacity of the varlen cases


def _varlen_case(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, N + 1, (B,), generator=g)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).clamp_max(T).to(torch.int32)
    x = torch.randn(T, D, generator=g)
    metric = torch.randn(T, C, generator=g)
    size = torch.rand(T, generator=g) + 0.5
    tau = torch.rand(B, generator=g) * 0.6 - 0.3
    qkv = torch.randn(3, T, 2, HD, generator=g)
    return x, metric, size, cu, tau, qkv


# Each public op as a function of tensors only (what changes between calls) + its inputs.
def _ops_under_test(backend):
    def similarity(metric, lengths):
        return dk.bipartite_similarity(metric, lengths, protect_first=True, backend=backend)

    def select(metric, lengths, tau):
        node_max, node_idx = dk.bipartite_similarity(metric, lengths, backend=backend)
        return dk.select_edges(node_max, node_idx, lengths, tau, metric.shape[1], backend=backend)

    def scatter(x, size, metric, lengths):
        node_max, node_idx = dk.bipartite_similarity(metric, lengths, backend="reference")
        row_map, new_lengths = dk.select_edges(node_max, node_idx, lengths, 0.0, x.shape[1], backend="reference")
        return dk.scatter_merge(x, size, row_map, new_lengths, backend=backend)

    def merge(x, metric, size, lengths, tau, pos_map):
        return tuple(dk.dtome_merge(x, metric, size, lengths, tau, pos_map=pos_map, protect_first=True, backend=backend))

    def merge_plain(x, metric, lengths, tau):
        return tuple(t for t in dk.dtome_merge(x, metric, None, lengths, tau, backend=backend) if t is not None)

    def threshold(metric, lengths):
        node_max, _ = dk.bipartite_similarity(metric, lengths, backend=backend)
        return dk.batch_threshold(node_max, 2, backend=backend)

    def vtu(q, k, v, cos, sin, pos_map, full_lengths):
        return dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, backend=backend)

    def decode(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths):
        return dk.vtu_decode_attention(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths=full_lengths,
                                       backend=backend)

    def merge_varlen(x, metric, size, cu, tau):
        return tuple(dk.dtome_merge_varlen(x, metric, size, cu, tau, protect_first=True, max_seqlen=N, backend=backend)
                     [:3])

    def attention_varlen(qkv, size, cu):
        return dk.proportional_attention_varlen(qkv[0], qkv[1], qkv[2], size, cu, max_seqlen=N, backend=backend)

    def case(seed):
        x, metric, size, lengths, tau, pos_map = _dtome_case(seed)
        vx, vmetric, vsize, vcu, vtau, vqkv = _varlen_case(seed)
        vt = _vtu_case(seed)
        return {
            "bipartite_similarity": (similarity, (metric, lengths)),
            "select_edges": (select, (metric, lengths, tau)),
            "scatter_merge": (scatter, (x, size, metric, lengths)),
            "dtome_merge": (merge, (x, metric, size, lengths, tau, pos_map)),
            "dtome_merge_defaults": (merge_plain, (x, metric, lengths, tau[0])),
            "batch_threshold": (threshold, (metric, lengths)),
            "vtu_attention": (vtu, vt),
            "vtu_decode_attention": (decode, _decode_case(seed)),
            "dtome_merge_varlen": (merge_varlen, (vx, vmetric, vsize, vcu, vtau)),
            "proportional_attention_varlen": (attention_varlen, (vqkv, vsize, vcu)),
        }

    return case


OP_NAMES = [
    "bipartite_similarity", "select_edges", "scatter_merge", "dtome_merge", "dtome_merge_defaults",
    "batch_threshold", "vtu_attention", "vtu_decode_attention", "dtome_merge_varlen", "proportional_attention_varlen",
]


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]


def _assert_equal(a, b):
    for x, y in zip(_flat(a), _flat(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_compiles_fullgraph_equal_to_eager_without_recompiling(backend, name, dynamic):
    torch._dynamo.reset()
    case = _ops_under_test(backend)
    fn, args = case(0)[name]
    counter = Counting()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    _assert_equal(compiled(*args), fn(*args))
    # New lengths, thresholds and map values (same shapes): no recompilation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            _, args = case(seed)[name]
            _assert_equal(compiled(*args), fn(*args))
    assert counter.count == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS + INTERPRETED)
def test_inductor_fullgraph_merge_and_vtu(backend):
    torch._dynamo.reset()
    case = _ops_under_test(backend)
    for name in ("dtome_merge", "vtu_attention"):
        fn, args = case(0)[name]
        _assert_equal(torch.compile(fn, fullgraph=True)(*args), fn(*args))


def test_python_float_threshold_compiles_fullgraph():
    torch._dynamo.reset()
    x, metric, _, lengths, _, _ = _dtome_case(0)
    fn = torch.compile(lambda x, m, L, t: dk.dtome_merge(x, m, None, L, t).x, fullgraph=True, dynamic=True)
    for tau in (0.1, -0.2, math.inf):
        _assert_equal(fn(x, metric, lengths, tau), dk.dtome_merge(x, metric, None, lengths, tau).x)


def test_compiled_call_skips_value_checks_but_keeps_metadata_checks():
    torch._dynamo.reset()
    metric = torch.randn(B, N, C)
    fn = torch.compile(lambda m, L: dk.bipartite_similarity(m, L, backend="reference"), fullgraph=True)
    fn(metric, _lengths(N, 3, 0))  # values in range
    with pytest.raises(ValueError, match="lengths"):
        dk.bipartite_similarity(metric, _lengths(N + 1, 3, 0), backend="reference")
    fn(metric, _lengths(N + 1, 3, 0))  # eager raises; the compiled graph does not read values
    # Metadata checks still run at trace time (fullgraph reports them as Unsupported, plain
    # compile falls back to eager and raises the op's own error).
    with pytest.raises(TypeError, match="lengths"):
        torch.compile(lambda m: dk.bipartite_similarity(m, torch.ones(B)))(metric)
    with pytest.raises(Exception, match="lengths must have dtype"):
        torch.compile(lambda m: dk.bipartite_similarity(m, torch.ones(B)), fullgraph=True)(metric)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples():
    x, metric, size, lengths, tau, pos_map = _dtome_case(0)
    node_max, node_idx = dk.bipartite_similarity(metric, lengths, backend="reference")
    row_map, new_lengths = dk.select_edges(node_max, node_idx, lengths, tau, N, backend="reference")
    q, k, v, cos, sin, vmap, full_lengths = _vtu_case(0)
    cos, sin = cos.expand(B, *cos.shape), sin.expand(B, *sin.shape)
    dq, dk_rows, dv_rows, dcos, dsin, dmap, dpos, dlen = _decode_case(0)
    vx, vmetric, vsize, vcu, vtau, vqkv = _varlen_case(0)
    vpos = torch.randint(0, int(vcu[-1]) or 1, (B, N0), dtype=torch.int32)
    return {
        "bipartite_similarity": [(metric, lengths, True), (metric.half(), lengths, False)],
        "select_edges": [(node_max, node_idx, lengths, tau, N, False), (node_max, node_idx, lengths, tau, N, True)],
        "scatter_merge": [(x, size, row_map, new_lengths)],
        "dtome_merge": [(x, metric, size, lengths, tau, pos_map, True), (x, metric, size, lengths, tau, None, False)],
        "batch_threshold": [(node_max, 2), (node_max, 100)],
        "vtu_attention": [(q, k, v, cos, sin, vmap, full_lengths, True, HD**-0.5)],
        "dtome_merge_varlen": [
            (vx, vmetric, vsize, vcu, vtau, vpos, True, N), (vx, vmetric, vsize, vcu, vtau, None, False, T)
        ],
        "proportional_attention_varlen": [(vqkv[0], vqkv[1], vqkv[2], vsize, vcu, HD**-0.5, N)],
        "vtu_decode_attention": [
            (dq, dk_rows, dv_rows, dcos.expand(B, *dcos.shape), dsin.expand(B, *dsin.shape), dmap, dpos, dlen, HD**-0.5)
        ],
    }


def test_every_public_op_is_registered():
    """An op in _backends.FAMILIES without a dymu_kernels._ops.SPECS entry runs eagerly only
    (it breaks a compiled graph): add its schema line there (see _ops' docstring)."""
    missing = sorted(set(dk._backends.FAMILIES) - set(_ops.SPECS))
    assert not missing, f"add an OpSpec to dymu_kernels/_ops.py SPECS for {missing}"


def test_every_registered_op_has_opcheck_samples():
    assert set(_opcheck_samples()) == set(_ops.SPECS)


@pytest.mark.parametrize("name", sorted(_ops.SPECS))
@pytest.mark.parametrize("backend", CPU_BACKENDS + INTERPRETED)
def test_opcheck(backend, name):
    if not dk._backends.implements(backend, name):
        pytest.skip(f"{backend} does not implement {name}")
    for args in _opcheck_samples()[name]:
        torch.library.opcheck(_ops.op(name), (backend, *args))


# ----------------------------------------------------------------------------- model layer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dtome_encoder_compiles_fullgraph(backend, monkeypatch):
    from dymu import DToMeEncoder

    monkeypatch.setenv("DYMU_BACKEND", backend)
    torch.manual_seed(1234)
    config = transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
        intermediate_size=64, attn_implementation="eager",
    )
    encoder = DToMeEncoder(transformers.CLIPVisionModel(config).eval(), [0.2, 0.0], shrink=False)
    pixels = torch.randn(2, 3, 28, 28)
    torch._dynamo.reset()
    eager = encoder(pixels)
    assert eager.lengths.tolist() != [eager.pos_map.shape[1]] * 2  # something merged
    out = torch.compile(encoder, fullgraph=True)(pixels)
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    for name in ("sizes", "lengths", "pos_map", "layer_lengths"):
        torch.testing.assert_close(getattr(out, name), getattr(eager, name), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vtu_forward_compiles_fullgraph(backend):
    import dymu

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=256, attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randn(2, 6, 64)
    pos_map = torch.tensor([[0, 1, 1, 2, 3, 3, 4, 5, 5], [0, 0, 1, 2, 2, 3, 4, 5, 5]], dtype=torch.int32)
    torch._dynamo.reset()

    def fn(x, pos_map):
        return dymu.vtu_forward(model, x, pos_map, backend=backend).logits

    eager = fn(x, pos_map)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, pos_map), eager, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_compiles_fullgraph_on_cuda(name, dynamic):
    """Every op on CUDA tensors (default backend: triton) compiles fullgraph, equal to eager."""
    torch._dynamo.reset()
    case = _ops_under_test(None)
    fn, args = case(0)[name]
    args = [a.cuda() for a in args]
    counter = Counting()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    _assert_equal(compiled(*args), fn(*args))
    with torch._dynamo.config.patch(error_on_recompile=True):
        _, args = case(1)[name]
        args = [a.cuda() for a in args]
        _assert_equal(compiled(*args), fn(*args))
    assert counter.count == 1



def _graph_replay(fn, make_args):
    """Capture fn(*static) in a CUDA graph, then replay with new inputs copied in."""
    static = make_args(0)
    fn(*static)  # warm-up (allocations, Triton compilation) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    for seed in (1, 2):
        new = make_args(seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        _assert_equal(out, fn(*new))


@pytest.mark.gpu
def test_cuda_graph_dtome_step():
    def make(seed):
        return [t.cuda() for t in _dtome_case(seed)]

    _graph_replay(lambda x, m, s, L, t, p: tuple(dk.dtome_merge(x, m, s, L, t, pos_map=p, protect_first=True)), make)


@pytest.mark.gpu
def test_cuda_graph_vtu_call():
    def make(seed):
        return [t.cuda() for t in _vtu_case(seed)]

    _graph_replay(lambda q, k, v, c, s, p, L: dk.vtu_attention(q, k, v, c, s, p, full_lengths=L), make)
