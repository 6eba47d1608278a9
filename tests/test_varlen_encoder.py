"""DToMeEncoder layout="packed" (the default) against layout="padded", image by image.

Same lengths, pos_map, sizes and layer lengths exactly; hidden states and pooler within rounding
(the packed path runs dk.proportional_attention_varlen where the padded one runs SDPA with a
float mask). Random tiny CLIP / SigLIP / DINOv2 models, and the real DINOv2-S/14 on demo photos.
"""

import math

import pytest
import torch

from dymu import DToMeEncoder
from dymu.encoders import unpack

transformers = pytest.importorskip("transformers")

from test_encoders import BUILDERS, HAS_CLS, HIDDEN, LAYERS, _pixels  # noqa: E402


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(4321)
    return {name: build().eval() for name, build in BUILDERS.items()}


def assert_same_output(packed, padded, atol=1e-5, rtol=1e-5):
    assert torch.equal(packed.lengths, padded.lengths)
    assert torch.equal(packed.layer_lengths, padded.layer_lengths)
    assert torch.equal(packed.pos_map, padded.pos_map)
    assert packed.last_hidden_state.shape == padded.last_hidden_state.shape
    assert torch.equal(packed.sizes, padded.sizes)
    torch.testing.assert_close(packed.last_hidden_state, padded.last_hidden_state, atol=atol, rtol=rtol)
    if padded.pooler_output is not None:
        torch.testing.assert_close(packed.pooler_output, padded.pooler_output, atol=atol, rtol=rtol)
    else:
        assert packed.pooler_output is None
    assert packed.num_syncs == padded.num_syncs


THRESHOLDS = [[0.6, math.inf, 0.3], [0.2, 0.2, 0.2], [-math.inf, 0.5, math.inf], [2.0, 2.0, 2.0]]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("thresholds", THRESHOLDS, ids=lambda t: "_".join(str(v) for v in t))
@pytest.mark.parametrize("shrink", [True, False])
def test_packed_equals_padded_random_models(models, name, thresholds, shrink):
    model, pixels = models[name], _pixels(bsz=4)
    packed = DToMeEncoder(model, thresholds, shrink=shrink)(pixels)
    padded = DToMeEncoder(model, thresholds, shrink=shrink, layout="padded")(pixels)
    assert_same_output(packed, padded)
    # the packed form: rows of image b at cu[b]..cu[b+1], zero past the total
    cu = packed.cu_seqlens
    assert cu.dtype == torch.int32 and torch.equal(cu[1:] - cu[:-1], packed.lengths)
    assert torch.equal(packed.packed_pos_map, packed.pos_map + cu[:-1, None])
    width = packed.last_hidden_state.shape[1]
    assert torch.equal(unpack(packed.packed_hidden_state, cu, width), packed.last_hidden_state)
    total = int(cu[-1])
    assert bool((packed.packed_hidden_state[total:] == 0).all()) and bool((packed.packed_sizes[total:] == 0).all())
    if shrink:
        assert packed.packed_hidden_state.shape[0] == total
    else:
        assert packed.packed_hidden_state.shape[0] == 4 * packed.pos_map.shape[1]
    assert padded.cu_seqlens is None


@pytest.mark.parametrize("name", list(BUILDERS))
def test_packed_output_layers_and_per_image_tau(models, name):
    model, pixels = models[name], _pixels(bsz=3)
    for k in (1, -2, LAYERS):
        packed = DToMeEncoder(model, 0.4, output_layer=k)(pixels)
        padded = DToMeEncoder(model, 0.4, output_layer=k, layout="padded")(pixels)
        assert_same_output(packed, padded)

    n0 = packed.pos_map.shape[1]

    def tau_fn(layer, metric, lengths):  # calibration-style: the metric comes unpacked, [B, N, C]
        assert metric.dim() == 3 and metric.shape[0] == 3 and lengths.shape == (3,)
        return torch.tensor([0.3, 0.5, 0.7])

    a = DToMeEncoder(model, math.inf).run(pixels, tau_fn)
    assert a.last_hidden_state.shape[1] <= n0
    b = DToMeEncoder(model, math.inf, layout="padded").run(pixels, tau_fn)
    assert_same_output(a, b)


def test_bad_layout(models):
    with pytest.raises(ValueError, match="layout"):
        DToMeEncoder(models["clip"], 0.5, layout="ragged")


@pytest.mark.slow
def test_packed_equals_padded_dinov2_demo_photos():
    from dymu.app.assets import load_dinov2
    from dymu.calibration import load_thresholds
    from dymu.app.demo import thresholds_path
    from dymu.app.photos import load_photos

    vit, preprocess = load_dinov2()
    photos = load_photos()  # the 13 demo photos
    pixels = preprocess([img for _, img in photos])
    for setting in ("low", "mid", "high"):
        th = load_thresholds(thresholds_path(setting), num_layers=vit.config.num_hidden_layers)
        packed = DToMeEncoder(vit, th)(pixels)
        padded = DToMeEncoder(vit, th, layout="padded")(pixels)
        assert len(set(packed.lengths.tolist())) > 1
        assert_same_output(packed, padded, atol=2e-4, rtol=2e-4)
