"""DToMeEncoder against transformers' own CLIP / SigLIP / DINOv2 vision models (tiny, random, fp32).

The stock model is the oracle:
- every threshold +inf: no merge step runs at all, so the output equals the stock output row for
  row (same token order);
- a finite threshold above every cosine score (2.0): every merge step runs but merges nothing.
  A merge step reorders rows to [even rows ; odd rows] (README, Semantics: DToMe rule 6), so the
  output is compared after gathering rows back with pos_map (row of every original token);
- a merging threshold: invariants (sizes sum to N0, pos_map < lengths, zero padding), and the
  batched run equals each image run alone (batch of one, no padding at all).
"""

import math

import pytest
import torch

from dymu import DToMeEncoder

transformers = pytest.importorskip("transformers")

LAYERS = 3
HIDDEN = 32
COMMON = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=28, patch_size=7,
    attn_implementation="eager",
)


def _clip():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=64, **COMMON))


def _siglip():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=64, **COMMON))


def _dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **COMMON))


BUILDERS = {"clip": _clip, "siglip": _siglip, "dinov2": _dinov2}
HAS_CLS = {"clip": True, "siglip": False, "dinov2": True}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1234)
    return {name: build().eval() for name, build in BUILDERS.items()}


def _pixels(bsz=3, seed=0):
    """Images of different complexity: flat, two-tone, noise (so lengths differ per image)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.full((3, 28, 28), 0.3) + 0.02 * torch.randn(3, 28, 28, generator=g)
    halves = torch.cat([torch.full((3, 28, 14), -1.0), torch.full((3, 28, 14), 1.0)], dim=2)
    halves = halves + 0.05 * torch.randn(3, 28, 28, generator=g)
    noise = torch.randn(3, 28, 28, generator=g)
    return torch.stack([flat, halves, noise, noise.flip(-1)][:bsz])


def _stock(model, pixels):
    with torch.no_grad():
        return model(pixels, output_hidden_states=True)


def _unpermute(out):
    """Rows back in the original token order: row pos_map[b, p] for every original token p."""
    idx = out.pos_map.long()[..., None].expand(-1, -1, out.last_hidden_state.shape[-1])
    return out.last_hidden_state.gather(1, idx)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_infinite_thresholds_equal_stock(models, name):
    model, pixels = models[name], _pixels()
    stock = _stock(model, pixels)
    out = DToMeEncoder(model, [math.inf] * LAYERS)(pixels)
    torch.testing.assert_close(out.last_hidden_state, stock.last_hidden_state, atol=1e-5, rtol=1e-5)
    n0 = stock.last_hidden_state.shape[1]
    assert out.lengths.tolist() == [n0] * 3
    assert torch.equal(out.pos_map, torch.arange(n0, dtype=torch.int32).expand(3, n0))
    assert torch.equal(out.sizes, torch.ones(3, n0))
    assert out.num_syncs == 0 and tuple(out.layer_lengths.shape) == (LAYERS, 3)
    if HAS_CLS[name]:
        torch.testing.assert_close(out.pooler_output, stock.pooler_output, atol=1e-5, rtol=1e-5)
    for k in (0, 1, -2, LAYERS):
        out = DToMeEncoder(model, math.inf, output_layer=k)(pixels)
        torch.testing.assert_close(out.last_hidden_state, stock.hidden_states[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_merge_steps_that_merge_nothing_equal_stock_after_unpermuting(models, name):
    model, pixels = models[name], _pixels()
    stock = _stock(model, pixels)
    n0 = stock.last_hidden_state.shape[1]
    for k in (-1, 1, -2, LAYERS):
        out = DToMeEncoder(model, 2.0, output_layer=k)(pixels)  # cosine scores are <= 1: no edge passes
        expected = stock.last_hidden_state if k == -1 else stock.hidden_states[k]
        ran = LAYERS if k == -1 else k % (LAYERS + 1)
        assert out.num_syncs == ran and out.lengths.tolist() == [n0] * 3
        if ran:  # the merge steps did reorder the rows
            assert not torch.equal(out.pos_map[0], torch.arange(n0, dtype=torch.int32))
        torch.testing.assert_close(_unpermute(out), expected, atol=1e-5, rtol=1e-5)
        if HAS_CLS[name]:
            assert out.pos_map[:, 0].tolist() == [0, 0, 0]  # CLS stays row 0


def _check_invariants(out, n0):
    bsz, n = out.sizes.shape
    assert out.last_hidden_state.shape[:2] == (bsz, n)
    torch.testing.assert_close(out.sizes.sum(1), torch.full((bsz,), float(n0)))
    valid = out.valid_mask
    assert bool((out.sizes[valid] >= 1).all()) and bool((out.sizes[~valid] == 0).all())
    assert bool((out.last_hidden_state[~valid] == 0).all())
    assert bool((out.pos_map >= 0).all()) and bool((out.pos_map < out.lengths[:, None]).all())
    # every kept row stands for exactly `size` original tokens
    counts = torch.zeros(bsz, n).scatter_add_(1, out.pos_map.long(), torch.ones(bsz, n0))
    assert torch.equal(counts, out.sizes)
    assert bool((out.layer_lengths[1:] <= out.layer_lengths[:-1]).all())
    assert torch.equal(out.layer_lengths[-1], out.lengths)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_finite_thresholds_batched_equals_each_image_alone(models, name):
    model, pixels = models[name], _pixels(bsz=4)
    thresholds = [0.6, math.inf, 0.3]
    encoder = DToMeEncoder(model, thresholds)
    out = encoder(pixels)
    n0 = out.pos_map.shape[1]
    _check_invariants(out, n0)
    assert len(set(out.lengths.tolist())) > 1, "the test images should keep different numbers of tokens"
    assert out.num_syncs == 2
    assert out.last_hidden_state.shape[1] == int(out.lengths.max())
    if HAS_CLS[name]:
        assert out.pos_map[:, 0].tolist() == [0] * 4 and out.sizes[:, 0].tolist() == [1.0] * 4
    for b in range(pixels.shape[0]):
        alone = encoder(pixels[b : b + 1])
        t = int(alone.lengths[0])
        assert t == int(out.lengths[b])
        assert torch.equal(alone.pos_map[0], out.pos_map[b])
        assert torch.equal(alone.sizes[0, :t], out.sizes[b, :t])
        torch.testing.assert_close(alone.last_hidden_state[0, :t], out.last_hidden_state[b, :t], atol=1e-5, rtol=1e-5)
    # shrink=False: same values, static N0 rows, no host sync
    lazy = DToMeEncoder(model, thresholds, shrink=False)(pixels)
    assert lazy.num_syncs == 0 and lazy.last_hidden_state.shape[1] == n0
    _check_invariants(lazy, n0)
    n = out.last_hidden_state.shape[1]
    assert torch.equal(lazy.pos_map, out.pos_map) and torch.equal(lazy.lengths, out.lengths)
    torch.testing.assert_close(lazy.last_hidden_state[:, :n], out.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_protect_cls_override_and_siglip_default(models):
    pixels = _pixels()
    out = DToMeEncoder(models["siglip"], -math.inf)(pixels)  # every source merges, nothing protected
    n0 = out.pos_map.shape[1]
    assert out.layer_lengths[:, 0].tolist() == [n0 // 2, n0 // 4, n0 // 8]  # 16 -> 8 -> 4 -> 2
    clip = DToMeEncoder(models["clip"], -math.inf, protect_cls=False)(pixels)
    _check_invariants(clip, n0 + 1)


def test_wrappers_are_unwrapped():
    torch.manual_seed(0)
    wrapped = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **COMMON)
    ).eval()
    pixels = _pixels()
    out = DToMeEncoder(wrapped, math.inf)(pixels)
    stock = _stock(wrapped, pixels)
    torch.testing.assert_close(out.last_hidden_state, stock.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_bad_inputs(models):
    with pytest.raises(TypeError, match="CLIPVisionModel, SiglipVisionModel or Dinov2Model"):
        DToMeEncoder(torch.nn.Linear(4, 4), math.inf)
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        DToMeEncoder("clip", math.inf)
    with pytest.raises(ValueError, match=f"expected {LAYERS}, got 2"):
        DToMeEncoder(models["clip"], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        DToMeEncoder(models["dinov2"], [0.5, float("nan"), 0.5])
    with pytest.raises(ValueError, match="output_layer"):
        DToMeEncoder(models["siglip"], 0.5, output_layer=LAYERS + 1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        DToMeEncoder(models["siglip"], 0.5)(torch.zeros(3, 28, 28))


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_shrink_false_never_syncs(models, name):
    """Under FakeTensorMode any host read of device data raises: shrink=False makes none, while
    shrink=True makes its documented one per merging block."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        pixels = torch.randn(2, 3, 28, 28)
        out = DToMeEncoder(models[name], [0.5, math.inf, 0.3], shrink=False)(pixels)
        assert tuple(out.last_hidden_state.shape) == (2, 17, HIDDEN) and out.num_syncs == 0
        with pytest.raises(DataDependentOutputException):
            DToMeEncoder(models[name], 0.5)(pixels)
