"""VTU inside HF Llama-family causal LMs, with transformers' own modules as the oracle.

Tiny random configs (hidden 64, 2 layers, 4 query / 2 KV heads, vocab 100, eager attention,
fp32). The oracle for a merged map is the definition of VTU written with the stock modules:
every layer's stock attention module run on the expanded sequence (merged rows gathered to
full length, RoPE at the full positions), followed by the segment mean back to merged rows;
norms, MLPs and lm_head are the stock modules on the merged rows.
"""

import pytest
import torch

import dymu
from helpers import tiny_causal_lm  # noqa: E402
from conftest import backend_params
from dymu.vtu_llm import _patched_attention, _plan

transformers = pytest.importorskip("transformers")

# The Triton interpreter takes ~15 s per model call here: its model-level run is one slow test.
BACKENDS = [p for p in backend_params("vtu_attention") if p.id != "triton"]
TRITON = [p for p in backend_params("vtu_attention") if p.id == "triton"]



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: intra-op threads only add contention (30x slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_tiny = tiny_causal_lm


@pytest.fixture(scope="module")
def llama():
    return _tiny("LlamaForCausalLM", "LlamaConfig")


@pytest.fixture(scope="module")
def qwen2():
    model = _tiny("Qwen2ForCausalLM", "Qwen2Config")
    with torch.no_grad():  # random init leaves biases at 0: make the QKV bias matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return request.getfixturevalue(request.param)


def random_map(nf, nu, seed):
    """[Nf] int64 map onto [0, Nu): every row covered, groups scattered (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    pos_map = torch.randint(0, nu, (nf,), generator=g)
    pos_map[torch.randperm(nf, generator=g)[:nu]] = torch.arange(nu)
    return pos_map


def expand(x, pos_map):
    """[B, Nu, H] merged rows -> [B, Nf, H] full rows."""
    return x.gather(1, pos_map.long()[..., None].expand(*pos_map.shape, x.shape[-1]))


def segment_mean(full, pos_map, nu):
    """[B, Nf, H] -> [B, Nu, H] mean over the positions of each merged row."""
    index = pos_map.long()[..., None].expand_as(full)
    sums = full.new_zeros(full.shape[0], nu, full.shape[-1]).scatter_add_(1, index, full)
    counts = full.new_zeros(full.shape[0], nu).scatter_add_(1, pos_map.long(), torch.ones_like(full[..., 0]))
    return sums / counts[..., None]


def stock_cache(output):
    """The cache of a stock forward (``cache`` in transformers >= 5.2x, else past_key_values)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def causal_mask(nf, dtype=torch.float32):
    mask = torch.full((nf, nf), torch.finfo(dtype).min).triu(1)
    return mask[None, None]


def stock_attention_full(attn, rotary, hidden_full, position_ids):
    """The stock attention module (o_proj included) on the expanded sequence."""
    cos, sin = rotary(hidden_full, position_ids)
    out, _ = attn(hidden_states=hidden_full, position_embeddings=(cos, sin), attention_mask=causal_mask(hidden_full.shape[1]))
    return out


@torch.no_grad()
def oracle_logits(model, x, pos_map, position_ids=None):
    """VTU defined with stock modules: stock attention on the expansion, then segment mean."""
    bsz, nu, _ = x.shape
    nf = pos_map.shape[1]
    if position_ids is None:
        position_ids = torch.arange(nf)[None].expand(bsz, nf)
    h = x
    for layer in model.model.layers:
        normed = layer.input_layernorm(h)
        attn_full = stock_attention_full(layer.self_attn, model.model.rotary_emb, expand(normed, pos_map), position_ids)
        h = h + segment_mean(attn_full, pos_map, nu)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


# ----------------------------------------------------------------------------- (a) identity map


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_map_equals_stock_logits(model, backend):
    x = torch.randn(2, 11, 64)
    pos_map = torch.arange(11).expand(2, 11)
    out = dymu.vtu_forward(model, x, pos_map, backend=backend)
    with torch.no_grad():
        ref = model(inputs_embeds=x).logits
    assert out.logits.shape == (2, 11, 100)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_identity_map_bf16_within_2x_of_stock(llama):
    import copy

    from helpers import assert_within_2x_torch

    model16 = copy.deepcopy(llama).to(torch.bfloat16)
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        oracle = llama(inputs_embeds=x).logits
        stock16 = model16(inputs_embeds=x.bfloat16()).logits
    out = dymu.vtu_forward(model16, x.bfloat16(), torch.arange(10)[None])
    assert out.logits.dtype == torch.bfloat16
    assert_within_2x_torch(out.logits, stock16, oracle, floor=1e-2)


def test_identity_map_position_ids_and_rope_scaling():
    model = _tiny(
        "LlamaForCausalLM", "LlamaConfig", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    )
    x = torch.randn(1, 9, 64)
    position_ids = torch.arange(9)[None] + 5
    out = dymu.vtu_forward(model, x, torch.arange(9)[None], position_ids=position_ids)
    with torch.no_grad():
        ref = model(inputs_embeds=x, position_ids=position_ids).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_mistral_identity_map():
    model = _tiny("MistralForCausalLM", "MistralConfig", sliding_window=None)
    x = torch.randn(1, 8, 64)
    out = dymu.vtu_forward(model, x, torch.arange(8)[None])
    with torch.no_grad():
        ref = model(inputs_embeds=x).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- (b, c) merged maps


def test_one_layer_equals_stock_attention_then_segment_mean(model):
    """Layer 0's patched attention == stock attention on the expansion + segment mean."""
    nu, nf = 7, 19
    pos_map = torch.stack([random_map(nf, nu, 1), random_map(nf, nu, 2)])
    h = torch.randn(2, nu, 64)
    attn = model.model.layers[0].self_attn
    plan = _plan(model, h, pos_map, None, None, None, "reference", None)
    with torch.no_grad(), _patched_attention(model, plan):
        ours, _ = attn(hidden_states=h, position_embeddings=None, attention_mask=None)
    with torch.no_grad():
        full = stock_attention_full(attn, model.model.rotary_emb, expand(h, pos_map), torch.arange(nf)[None].expand(2, nf))
    torch.testing.assert_close(ours, segment_mean(full, pos_map, nu), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_map_end_to_end_matches_oracle(model, backend):
    nu, nf = 8, 21
    pos_map = torch.stack([random_map(nf, nu, 3), random_map(nf, nu, 4)])
    x = torch.randn(2, nu, 64)
    out = dymu.vtu_forward(model, x, pos_map, backend=backend)
    torch.testing.assert_close(out.logits, oracle_logits(model, x, pos_map), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRITON)
def test_merged_map_triton_backend(llama, backend):
    nu, nf = 4, 9
    pos_map = random_map(nf, nu, 6)[None]
    x = torch.randn(1, nu, 64)
    out = dymu.vtu_forward(llama, x, pos_map, backend=backend)
    torch.testing.assert_close(out.logits, oracle_logits(llama, x, pos_map), atol=1e-5, rtol=1e-5)


def test_single_merged_group_is_consistent(model):
    """All groups of size 1 but one (positions 6, 7, 8 -> row 6): positions before the group
    see no merged key, so their logits equal the stock model on the expanded sequence."""
    nf = 14
    pos_map = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 6, 7, 8, 9, 10, 11])[None]
    x = torch.randn(1, 12, 64)
    out = dymu.vtu_forward(model, x, pos_map)
    with torch.no_grad():
        stock = model(inputs_embeds=expand(x, pos_map)).logits
    torch.testing.assert_close(out.logits[:, :6], stock[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, oracle_logits(model, x, pos_map), atol=1e-5, rtol=1e-5)
    # The merged group of identical embeddings differs from the stock rows only by the
    # re-merge; nothing is NaN and shapes follow the merged rows.
    assert out.logits.shape == (1, 12, 100) and bool(out.logits.isfinite().all())


# ----------------------------------------------------------------------------- (d) batching


def _two_sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    img_a = dymu.VTUImage(torch.randn(3, 64, generator=g), torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0]))
    img_b = dymu.VTUImage(torch.randn(2, 64, generator=g), torch.tensor([1, 0, 0, 1]))
    seq_a = [torch.randn(2, 64, generator=g), img_a, torch.randn(3, 64, generator=g)]
    seq_b = [torch.randn(4, 64, generator=g), img_b, torch.randn(1, 64, generator=g), img_a]
    return seq_a, seq_b


def test_build_vtu_inputs_layout():
    seq_a, seq_b = _two_sequences()
    batch = dymu.build_vtu_inputs([seq_a, seq_b])
    assert batch.full_lengths.tolist() == [2 + 9 + 3, 4 + 4 + 1 + 9]
    assert batch.merged_lengths.tolist() == [2 + 3 + 3, 4 + 2 + 1 + 3]
    assert batch.inputs_embeds.shape == (2, 10, 64) and batch.pos_map.shape == (2, 18)
    assert batch.pos_map[0].tolist() == [0, 1] + [2, 3, 3, 4, 2, 4, 4, 3, 2] + [5, 6, 7] + [-1] * 4
    assert batch.pos_map[1].tolist() == [0, 1, 2, 3, 5, 4, 4, 5, 6] + [7, 8, 8, 9, 7, 9, 9, 8, 7]
    torch.testing.assert_close(batch.inputs_embeds[0, 2:5], seq_a[1].tokens)
    torch.testing.assert_close(batch.inputs_embeds[1, 4:6], seq_b[1].tokens)
    assert bool((batch.inputs_embeds[0, 8:] == 0).all())


def test_batch_equals_each_sequence_alone(model):
    seq_a, seq_b = _two_sequences()
    batch = dymu.build_vtu_inputs([seq_a, seq_b])
    out = dymu.vtu_forward(model, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths)
    for b, seq in enumerate((seq_a, seq_b)):
        alone = dymu.build_vtu_inputs([seq])
        single = dymu.vtu_forward(model, alone.inputs_embeds, alone.pos_map)
        nu = int(batch.merged_lengths[b])
        torch.testing.assert_close(out.logits[b, :nu], single.logits[0], atol=1e-5, rtol=1e-5)
        assert bool((out.logits[b, nu:] == 0).all())  # padded merged rows
    mask = (torch.arange(batch.pos_map.shape[1])[None] < batch.full_lengths[:, None]).long()
    via_mask = dymu.vtu_forward(model, batch.inputs_embeds, batch.pos_map, attention_mask=mask)
    torch.testing.assert_close(via_mask.logits, out.logits)


# ----------------------------------------------------------------------------- (e) cache + generate


def test_cache_identity_map_equals_stock(model):
    x = torch.randn(2, 9, 64)
    out = dymu.vtu_forward(model, x, torch.arange(9).expand(2, 9), use_cache=True, cache="full")
    with torch.no_grad():
        ref = model(inputs_embeds=x, use_cache=True)
    ref_cache = stock_cache(ref)
    assert isinstance(out.past_key_values, transformers.DynamicCache) and out.cache is out.past_key_values
    assert out.past_key_values.get_seq_length() == 9
    for i, (ours, stock) in enumerate(zip(out.past_key_values.layers, ref_cache.layers)):
        if i == 0:  # same rows, same modules: bit-identical
            assert torch.equal(ours.keys, stock.keys) and torch.equal(ours.values, stock.values)
        torch.testing.assert_close(ours.keys, stock.keys, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.values, stock.values, atol=1e-6, rtol=1e-5)


def test_cache_merged_map_layer0_equals_stock_on_expansion(model):
    nu, nf = 6, 15
    pos_map = random_map(nf, nu, 5)[None]
    x = torch.randn(1, nu, 64)
    out = dymu.vtu_forward(model, x, pos_map, use_cache=True, cache="full")
    with torch.no_grad():
        ref = model(inputs_embeds=expand(x, pos_map), use_cache=True)
    ref_cache = stock_cache(ref)
    ours, stock = out.past_key_values.layers[0], ref_cache.layers[0]
    assert ours.keys.shape == (1, 2, nf, 16)
    torch.testing.assert_close(ours.keys, stock.keys, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.values, stock.values, atol=1e-6, rtol=1e-6)


def test_generate_identity_map_equals_stock_greedy(model):
    x = torch.randn(2, 7, 64)
    ours = dymu.generate(model, x, torch.arange(7).expand(2, 7), 6)
    with torch.no_grad():
        stock = model.generate(inputs_embeds=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours.shape == (2, 6)
    assert torch.equal(ours, stock)


def test_generate_batch_equals_each_alone_and_sampling(llama):
    seq_a, seq_b = _two_sequences(1)
    batch = dymu.build_vtu_inputs([seq_a, seq_b])
    together = dymu.generate(llama, batch.inputs_embeds, batch.pos_map, 5, full_lengths=batch.full_lengths)
    for b, seq in enumerate((seq_a, seq_b)):
        alone = dymu.build_vtu_inputs([seq])
        assert torch.equal(together[b], dymu.generate(llama, alone.inputs_embeds, alone.pos_map, 5)[0])
    args = (llama, batch.inputs_embeds, batch.pos_map, 5)
    kw = dict(full_lengths=batch.full_lengths, do_sample=True, temperature=0.7)
    s1 = dymu.generate(*args, **kw, generator=torch.Generator().manual_seed(3))
    s2 = dymu.generate(*args, **kw, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == (2, 5)
    assert torch.equal(dymu.generate(*args, full_lengths=batch.full_lengths, do_sample=True, top_k=1), together)
    # eos: a sequence that emitted it is padded afterwards; stop once all are done
    eos = int(together[0, 1])
    stopped = dymu.generate(*args, full_lengths=batch.full_lengths, eos_token_id=eos, pad_token_id=0)
    assert int(stopped[0, 1]) == eos and bool((stopped[0, 2:] == 0).all())


# ----------------------------------------------------------------------------- (f) restoring the model


def test_model_restored_after_call_and_after_error(llama, monkeypatch):
    attns = [layer.self_attn for layer in llama.model.layers]
    impl = llama.config._attn_implementation
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        before = llama(inputs_embeds=x).logits
    dymu.vtu_forward(llama, x, torch.arange(6)[None], use_cache=True)
    assert all("forward" not in a.__dict__ for a in attns)
    assert llama.config._attn_implementation == impl

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dymu.vtu_llm.dk, "vtu_attention", boom)
    with pytest.raises(RuntimeError, match="boom"):
        dymu.vtu_forward(llama, x, torch.arange(6)[None])
    assert all("forward" not in a.__dict__ for a in attns)
    with torch.no_grad():
        assert torch.equal(llama(inputs_embeds=x).logits, before)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_any_work(llama, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(dymu.vtu_llm.dk, "vtu_attention", boom)
    x, pos_map = torch.randn(2, 5, 64), torch.arange(5).expand(2, 5)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        dymu.vtu_forward(torch.nn.Linear(4, 4), x, pos_map)
    with pytest.raises(ValueError, match="batch size"):
        dymu.vtu_forward(llama, x, pos_map[:1])
    with pytest.raises(ValueError, match="H = 64"):
        dymu.vtu_forward(llama, torch.randn(2, 5, 32), pos_map)
    with pytest.raises(ValueError, match="does not cover merged row 2"):
        dymu.vtu_forward(llama, x, torch.tensor([[0, 1, 3, 4, 4]] * 2))
    with pytest.raises(ValueError, match="no sequence maps a position to row 4"):
        dymu.vtu_forward(llama, x, torch.tensor([[0, 1, 2, 3, 3]] * 2))
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        dymu.vtu_forward(llama, x, torch.tensor([[0, 1, 2, 3, 5]] * 2))
    with pytest.raises(ValueError, match="full_lengths"):
        dymu.vtu_forward(llama, x, pos_map, full_lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="right padding"):
        dymu.vtu_forward(llama, x, pos_map, attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2))
    with pytest.raises(ValueError, match="not both"):
        dymu.vtu_forward(llama, x, pos_map, full_lengths=torch.tensor([5, 5]), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        dymu.generate(llama, x, pos_map, 0)
    mistral = _tiny("MistralForCausalLM", "MistralConfig", sliding_window=4)
    with pytest.raises(ValueError, match="sliding-window"):
        dymu.vtu_forward(mistral, x, pos_map)


def test_build_vtu_inputs_bad_inputs():
    text = torch.randn(2, 64)
    with pytest.raises(ValueError, match="merged token 1 has no patch"):
        dymu.build_vtu_inputs([[text, dymu.VTUImage(torch.randn(3, 64), torch.tensor([0, 2, 2]))]])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        dymu.build_vtu_inputs([[dymu.VTUImage(torch.randn(3, 64), torch.tensor([0, 1, 3]))]])
    with pytest.raises(ValueError, match="differ from the first part"):
        dymu.build_vtu_inputs([[text, torch.randn(2, 32)]])
    with pytest.raises(ValueError, match="non-empty list"):
        dymu.build_vtu_inputs([[]])


def test_images_from_encoder_drops_cls():
    tokens = torch.randn(2, 4, 8)
    pos_map = torch.tensor([[0, 1, 2, 1, 3], [0, 1, 1, 2, 2]])
    images = dymu.images_from_encoder(tokens, pos_map, torch.tensor([4, 3]), drop_cls=True)
    assert [tuple(i.tokens.shape) for i in images] == [(3, 8), (2, 8)]
    assert images[0].pos_map.tolist() == [0, 1, 0, 2] and images[1].pos_map.tolist() == [0, 0, 1, 1]
