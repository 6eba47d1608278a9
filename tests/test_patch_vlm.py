"""dymu.patch_vlm on tiny random HF LLaVA models (built here from configs; nothing downloads).

- every threshold +inf: the patched model's logits equal the stock model's within 1e-5 and
  greedy generate gives the same tokens (a batch of three prompts with 0, 1 and 2 images,
  left-padded with the attention mask, as a processor pads for generation);
- finite thresholds: the patched generate equals the manual path (DToMeEncoder +
  images_from_encoder + build_vtu_inputs + dymu.generate on a separate causal LM with the same
  weights) token for token;
- remove() / leaving ``with`` restores bit-identical stock outputs;
- unsupported models, towers, LLMs and options are refused before anything changes.
"""

import math

import pytest
import torch

import dymu

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 99
PAD = 0
VOCAB = 128
IMAGE_SIZE, PATCH = 28, 7  # 16 patches per image


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vision_config(tower: str, **extra):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)  # fmt: skip
    common.update(extra)
    return {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig,
            "dinov2": transformers.Dinov2Config}[tower](**common)  # fmt: skip


def text_config(llm: str, **extra):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD)  # fmt: skip
    common.update(extra)
    return {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config}[llm](**common)  # fmt: skip


def tiny_llava(tower="clip", llm="llama", strategy="default", feature_layer=-2, seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=vision_config(tower), text_config=text_config(llm), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy, **extra,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves biases at 0 and the towers near-uniform: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def image_tokens(model) -> int:
    """Placeholder tokens per image: patches, plus CLS with strategy 'full', minus row 0 with 'default'."""
    patches = (IMAGE_SIZE // PATCH) ** 2
    has_cls = type(model.model.vision_tower).__name__ != "SiglipVisionModel"
    rows = patches + int(has_cls)
    return rows - 1 if model.config.vision_feature_select_strategy == "default" else rows


def prompts(model, images_per_prompt=(0, 1, 2), seed=1):
    """Processor-like inputs: left-padded input_ids, attention_mask, pixel_values [N_img, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    n = image_tokens(model)
    rows = []
    for count in images_per_prompt:
        ids = torch.randint(1, 90, (3,), generator=g).tolist()
        for _ in range(count):
            ids += [IMAGE_TOKEN] * n + torch.randint(1, 90, (2,), generator=g).tolist()
        ids += torch.randint(1, 90, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        rows.append(ids)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    num_images = sum(images_per_prompt)
    pixels = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    # smooth images: neighbouring patches alike, so finite thresholds merge some and not others
    pixels = torch.nn.functional.avg_pool2d(pixels, 5, stride=1, padding=2) * torch.linspace(0.5, 3, num_images)[:, None, None, None]
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def inf_thresholds(model):
    return [math.inf] * model.config.vision_config.num_hidden_layers


def finite_thresholds(model):
    """Thresholds that merge the test images to different lengths (random towers differ a lot)."""
    tau = {"CLIPVisionModel": 0.5, "SiglipVisionModel": 0.8, "Dinov2Model": 0.98}[type(model.model.vision_tower).__name__]
    return [tau] * model.config.vision_config.num_hidden_layers


@torch.no_grad()
def logits_of(model, inputs):
    return model(**inputs).logits


@torch.no_grad()
def greedy(model, inputs, n=6):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


# ----------------------------------------------------------------------------- +inf: the stock model


@pytest.mark.parametrize(
    "tower,llm,strategy",
    [("clip", "llama", "default"), ("siglip", "qwen2", "full"), ("siglip", "mistral", "default"), ("dinov2", "llama", "full")],
)
def test_inf_thresholds_equal_stock(tower, llm, strategy):
    model = tiny_llava(tower, llm, strategy)
    inputs = prompts(model)
    stock_logits, stock_tokens = logits_of(model, inputs), greedy(model, inputs)
    with dymu.patch_vlm(model, inf_thresholds(model), backend="reference") as handle:
        assert handle.active
        logits = logits_of(model, inputs)
        tokens = greedy(model, inputs)
        assert handle.last_lengths is not None  # the calls went through DyMU
    valid = inputs["attention_mask"].bool()
    assert (logits[valid] - stock_logits[valid]).abs().max() < 1e-5
    assert torch.equal(tokens, stock_tokens)


def right_padded(inputs):
    """The same prompts padded on the right (what a processor does for training)."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        ids[b] = torch.cat([ids[b, -n:], torch.full((ids.shape[1] - n,), PAD)])
        mask[b] = torch.cat([torch.ones(n, dtype=mask.dtype), torch.zeros(ids.shape[1] - n, dtype=mask.dtype)])
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def test_feature_layer_last_right_padding_native_backend():
    model = tiny_llava("clip", "llama", "default", feature_layer=-1)
    inputs = right_padded(prompts(model, (1, 0, 2)))
    stock = logits_of(model, inputs)
    with dymu.patch_vlm(model, inf_thresholds(model), backend="native"):
        logits = logits_of(model, inputs)
    valid = inputs["attention_mask"].bool()
    assert (logits[valid] - stock[valid]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- finite: the manual path


def manual_generate(model, inputs, thresholds, n=6):
    """The hand-wired path: DToMeEncoder + images_from_encoder + build_vtu_inputs + dymu.generate."""
    config = model.config
    tower, inner = model.model.vision_tower, model.model
    layers = config.vision_config.num_hidden_layers
    drop = config.vision_feature_select_strategy == "default"
    encoder = dymu.DToMeEncoder(tower, thresholds, protect_cls=True if drop else None,
                                output_layer=config.vision_feature_layer % (layers + 1))  # fmt: skip
    llm = getattr(transformers, type(inner.language_model).__name__.replace("Model", "ForCausalLM"))(config.text_config).eval()
    llm.model.load_state_dict(inner.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    with torch.no_grad():
        out = encoder(inputs["pixel_values"])
        images = dymu.images_from_encoder(out.last_hidden_state, out.pos_map, out.lengths, drop_cls=drop)
        images = [dymu.VTUImage(inner.multi_modal_projector(im.tokens), im.pos_map) for im in images]
        embed = llm.get_input_embeddings()
        sequences, k = [], 0
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
            ids = ids[mask.bool()].tolist()
            parts, text = [], []
            i = 0
            while i < len(ids):
                if ids[i] == IMAGE_TOKEN:
                    parts += [embed(torch.tensor(text, dtype=torch.long)), images[k]]
                    i += images[k].pos_map.shape[0]
                    k += 1
                    text = []
                else:
                    text.append(ids[i])
                    i += 1
            parts.append(embed(torch.tensor(text, dtype=torch.long)))
            sequences.append(parts)
        batch = dymu.build_vtu_inputs(sequences)
        tokens = dymu.generate(llm, batch.inputs_embeds, batch.pos_map, n, full_lengths=batch.full_lengths, backend="reference")
    return tokens, out.lengths


@pytest.mark.parametrize("tower,llm,strategy", [("clip", "llama", "default"), ("siglip", "qwen2", "full"), ("dinov2", "mistral", "default")])
def test_finite_thresholds_match_manual_path(tower, llm, strategy):
    model = tiny_llava(tower, llm, strategy)
    inputs = prompts(model)
    thresholds = finite_thresholds(model)
    expected, lengths = manual_generate(model, inputs, thresholds)
    assert lengths.min() < lengths.max(), "the test images should merge to different lengths"
    full = image_tokens(model) + int(strategy == "default")
    assert int(lengths.max()) < full, "some image should merge"
    with dymu.patch_vlm(model, thresholds, backend="reference") as handle:
        tokens = greedy(model, inputs)
        assert torch.equal(handle.last_lengths, lengths - int(strategy == "default"))
    assert torch.equal(tokens, expected)


def test_thresholds_object_and_dinov2_setting_names(tmp_path):
    model = tiny_llava("clip", "llama")
    path = tmp_path / "t.json"
    dymu.save_thresholds(str(path), finite_thresholds(model), encoder_name="tiny-clip")
    inputs = prompts(model, (1,))
    with dymu.patch_vlm(model, dymu.load_thresholds(str(path))) as handle:
        assert handle.thresholds == finite_thresholds(model)
        a = logits_of(model, inputs)
    with dymu.patch_vlm(model, finite_thresholds(model)):
        b = logits_of(model, inputs)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no thresholds ship"):
        dymu.patch_vlm(model, "mid")
    # the shipped DINOv2-S/14 settings resolve by name for a tower of that shape
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.Dinov2Config(hidden_size=384, intermediate_size=64, num_hidden_layers=12,
                                                num_attention_heads=6, image_size=28, patch_size=14),
        text_config=text_config("llama"), image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
    )  # fmt: skip
    vlm = transformers.LlavaForConditionalGeneration(config).eval()
    with dymu.patch_vlm(vlm, "mid") as handle:
        assert handle.thresholds == list(dymu.load_thresholds(dymu.vlm_patch.shipped_settings(vlm.model.vision_tower)["mid"]))
        assert all(0 <= t < 1 for t in handle.thresholds)


# ----------------------------------------------------------------------------- remove()


def test_remove_restores_bit_identical_stock():
    model = tiny_llava("siglip", "llama", "full")
    inputs = prompts(model)
    before = logits_of(model, inputs)
    config = model.config.to_dict()
    handle = dymu.patch_vlm(model, finite_thresholds(model))
    patched = logits_of(model, inputs)
    assert not torch.equal(patched, before)
    handle.remove()
    assert "forward" not in model.model.__dict__ and "get_image_features" not in model.model.__dict__
    assert model.config.to_dict() == config
    assert torch.equal(logits_of(model, inputs), before)
    handle.remove()  # idempotent
    with dymu.patch_vlm(model, finite_thresholds(model)):
        with pytest.raises(ValueError, match="already patched"):
            dymu.patch_vlm(model, finite_thresholds(model))
    assert torch.equal(logits_of(model, inputs), before)
    assert torch.equal(greedy(model, inputs), greedy(model, inputs))


def test_generate_decodes_from_the_merged_cache():
    """After an image prompt the patched model's cache is a dymu.MergedCache (the merged rows, not
    one K/V per position) and every decode step of generate reads it through VTU decode."""
    model = tiny_llava("siglip", "qwen2", "full")
    inputs = prompts(model)
    with dymu.patch_vlm(model, finite_thresholds(model)) as handle:
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        assert type(cache).__name__ == "MergedCache"
        steps = []
        original = type(handle)._decode

        def counted(self, *args, **kwargs):
            steps.append(1)
            return original(self, *args, **kwargs)

        type(handle)._decode = counted
        try:
            greedy(model, inputs, n=4)
        finally:
            type(handle)._decode = original
    assert len(steps) == 3  # every token after the first comes from the merged cache


def test_text_only_calls_are_stock():
    model = tiny_llava()
    inputs = prompts(model, (0, 0))
    inputs.pop("pixel_values")
    before = logits_of(model, inputs)
    with dymu.patch_vlm(model, finite_thresholds(model)):
        assert torch.equal(logits_of(model, inputs), before)


# ----------------------------------------------------------------------------- refusals


def _assert_unchanged(model):
    assert "forward" not in model.model.__dict__


def test_unsupported_models_are_refused_before_any_change():
    llm = transformers.LlamaForCausalLM(text_config("llama"))
    with pytest.raises(TypeError, match="patch_vlm supports LlavaForConditionalGeneration"):
        dymu.patch_vlm(llm, 0.5)
    model = tiny_llava(feature_layer=[-2, -3])
    with pytest.raises(NotImplementedError, match="vision_feature_layer"):
        dymu.patch_vlm(model, 0.5)
    _assert_unchanged(model)
    model = tiny_llava()
    with pytest.raises(ValueError, match="NaN"):
        dymu.patch_vlm(model, [math.nan] * 3)
    with pytest.raises(ValueError, match="one value per layer"):
        dymu.patch_vlm(model, [0.5] * 2)
    with pytest.raises(ValueError, match="backend"):
        dymu.patch_vlm(model, 0.5, backend="cuda-magic")
    _assert_unchanged(model)
    # an LLM without VTU support (Gemma: a different RoPE / norm layout)
    config = transformers.LlavaConfig(
        vision_config=vision_config("clip"),
        text_config=transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
        image_token_id=IMAGE_TOKEN,
    )  # fmt: skip
    gemma = transformers.LlavaForConditionalGeneration(config).eval()
    with pytest.raises(TypeError, match="unsupported language model GemmaModel"):
        dymu.patch_vlm(gemma, 0.5)
    _assert_unchanged(gemma)


def test_bad_calls_say_why():
    model = tiny_llava()
    inputs = prompts(model, (1,))
    with dymu.patch_vlm(model, finite_thresholds(model)):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])
        too_many = torch.cat([inputs["pixel_values"]] * 2)
        with pytest.raises(ValueError, match="placeholder tokens for 1"):
            model(input_ids=inputs["input_ids"], pixel_values=too_many)


# ----------------------------------------------------------------------------- LLaVA-OneVision (anyres)

PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
SIZES = [[20, 56], [56, 30], [28, 28], [50, 44], [21, 28]]  # (H, W): unpadding on both axes, square, ...


def tiny_onevision(seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision_config("siglip"), text_config=text_config("qwen2"), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full", **extra,
    )  # fmt: skip
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def onevision_prompts(model, images_per_prompt=(0, 1, 2), seed=1, sizes=SIZES):
    """Processor-like OneVision inputs: crops [N_img, 5, 3, 28, 28], image_sizes, batch_num_images,
    and as many placeholders per image as the stock layout gives it."""
    g = torch.Generator().manual_seed(seed)
    num_images = sum(images_per_prompt)
    sizes = torch.tensor(sizes[:num_images])
    pixels = torch.randn(num_images, 5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    pixels = torch.nn.functional.avg_pool2d(pixels.flatten(0, 1), 5, stride=1, padding=2).view_as(pixels)
    pixels = pixels * torch.linspace(0.5, 3, num_images)[:, None, None, None, None]
    batch_num_images = torch.tensor(images_per_prompt)
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, sizes, batch_num_images=batch_num_images).pooler_output
    counts = [f.shape[0] for f in feats]
    rows, k = [], 0
    for count in images_per_prompt:
        ids = torch.randint(1, 90, (3,), generator=g).tolist()
        for _ in range(count):
            ids += [IMAGE_TOKEN] * counts[k] + torch.randint(1, 90, (2,), generator=g).tolist()
            k += 1
        rows.append(ids)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes,
            "batch_num_images": batch_num_images}  # fmt: skip


@pytest.mark.parametrize("images_per_prompt", [(0, 1, 2), (1, 1, 0)])
def test_onevision_inf_thresholds_equal_stock(images_per_prompt):
    model = tiny_onevision()
    inputs = onevision_prompts(model, images_per_prompt)
    stock_logits, stock_tokens = logits_of(model, inputs), greedy(model, inputs)
    with dymu.patch_vlm(model, inf_thresholds(model), backend="reference") as handle:
        logits = logits_of(model, inputs)
        tokens = greedy(model, inputs)
        assert handle.last_lengths is not None
    valid = inputs["attention_mask"].bool()
    assert (logits[valid] - stock_logits[valid]).abs().max() < 1e-5
    assert torch.equal(tokens, stock_tokens)


def onevision_manual_generate(model, inputs, thresholds, n=6):
    """Manual path for multi-image prompts (no anyres: one crop per image, then the newline row)."""
    inner = model.model
    encoder = dymu.DToMeEncoder(inner.vision_tower, thresholds, output_layer=model.config.vision_config.num_hidden_layers)
    llm = transformers.Qwen2ForCausalLM(model.config.text_config).eval()
    llm.model.load_state_dict(inner.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    with torch.no_grad():
        out = encoder(inputs["pixel_values"][:, 0])
        images = dymu.images_from_encoder(inner.multi_modal_projector(out.last_hidden_state), out.pos_map, out.lengths)
        images = [dymu.VTUImage(torch.cat([im.tokens, inner.image_newline[None]]),
                                torch.cat([im.pos_map, torch.tensor([im.tokens.shape[0]], dtype=im.pos_map.dtype)]))
                  for im in images]  # fmt: skip
        embed = llm.get_input_embeddings()
        sequences, k = [], 0
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
            ids = ids[mask.bool()].tolist()
            parts, text, i = [], [], 0
            while i < len(ids):
                if ids[i] == IMAGE_TOKEN:
                    parts += [embed(torch.tensor(text, dtype=torch.long)), images[k]]
                    i += images[k].pos_map.shape[0]
                    k, text = k + 1, []
                else:
                    text.append(ids[i])
                    i += 1
            parts.append(embed(torch.tensor(text, dtype=torch.long)))
            sequences.append(parts)
        batch = dymu.build_vtu_inputs(sequences)
        tokens = dymu.generate(llm, batch.inputs_embeds, batch.pos_map, n, full_lengths=batch.full_lengths, backend="reference")
    return tokens, out.lengths


def test_onevision_finite_thresholds_match_manual_path():
    model = tiny_onevision()
    inputs = onevision_prompts(model, (0, 2, 3))
    thresholds = finite_thresholds(model)
    expected, lengths = onevision_manual_generate(model, inputs, thresholds)
    assert lengths.min() < lengths.max() < 16
    with dymu.patch_vlm(model, thresholds, backend="reference") as handle:
        tokens = greedy(model, inputs)
        assert torch.equal(handle.last_lengths, lengths)
    assert torch.equal(tokens, expected)


def test_onevision_anyres_crops_merge_independently():
    """Finite thresholds with anyres crops: every crop merged on its own; positions map onto the
    crop's merged rows (unpadding acts on positions), every newline a row of its own."""
    model = tiny_onevision()
    inputs = onevision_prompts(model, (1, 1, 1))
    thresholds = finite_thresholds(model)
    handle = dymu.patch_vlm(model, thresholds, backend="reference")
    try:
        crops = dymu.DToMeEncoder(model.model.vision_tower, thresholds)(
            torch.cat([inputs["pixel_values"][i, :n] for i, n in enumerate([3, 5, 2])])
        ).lengths
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"])
        assert torch.equal(handle.last_lengths, crops)
        for image, count in zip(features.dymu_images, [int(m.sum()) for m in (inputs["input_ids"] == IMAGE_TOKEN)]):
            assert image.pos_map.shape[0] == count  # one map entry per placeholder (stock layout length)
            assert torch.equal(torch.unique(image.pos_map), torch.arange(image.tokens.shape[0]))  # every row covered
        tokens = greedy(model, inputs)
        assert tokens.shape == (3, 6)
    finally:
        handle.remove()
    assert "get_image_features" not in model.model.__dict__ and "forward" not in model.model.__dict__


def test_onevision_refuses_steps_that_cannot_act_on_positions():
    model = tiny_onevision(vision_aspect_ratio="anyres_max_1")  # large images get bilinearly downscaled
    inputs = onevision_prompts(model, (1,), sizes=[[56, 56]])
    with dymu.patch_vlm(model, finite_thresholds(model)):
        with pytest.raises(NotImplementedError, match="interpolates"):
            model(**inputs)
        with pytest.raises(NotImplementedError, match="video"):
            model(input_ids=inputs["input_ids"], pixel_values_videos=torch.randn(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_unsupported_tower_is_refused():
    config = transformers.LlavaConfig(
        vision_config=transformers.Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=text_config("llama"), image_token_id=IMAGE_TOKEN,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with pytest.raises(TypeError, match="unsupported vision tower Dinov2WithRegistersModel"):
        dymu.patch_vlm(model, 0.5)
    _assert_unchanged(model)
