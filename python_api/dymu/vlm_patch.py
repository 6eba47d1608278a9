"""DyMU in a HuggingFace LLaVA model with one call: :func:`patch_vlm`.

    handle = dymu.patch_vlm(model, "mid")          # or a per-layer list, or load_thresholds(...)
    ids = model.generate(**processor_outputs, max_new_tokens=32)
    handle.remove()                                 # the stock model again, bit for bit

    with dymu.patch_vlm(model, thresholds):         # the same, scoped
        logits = model(**processor_outputs).logits

It composes the two halves of the model layer and changes one thing on the model: the inner
multimodal model's ``forward`` (``model.model.forward``, an instance attribute; ``remove()``
deletes it again). Its classes, config, weights, hooks and the vision tower are untouched. When
a call carries ``pixel_values``:

1. the vision tower runs through :class:`dymu.DToMeEncoder` (its own weights, the model's
   ``vision_feature_layer``; ``vision_feature_select_strategy="default"`` drops row 0, which is
   protected from merging so that it can be dropped exactly, also for towers without a CLS);
2. the projector runs on the merged rows (it acts per row);
3. every image's run of placeholder tokens becomes that image's merged rows plus its position
   map (:func:`dymu.build_vtu_inputs`), at the positions the stock model would give those
   tokens (``position_ids`` when given, else 0, 1, ... over the padded row, as HF does);
   padding (``attention_mask == 0``, left or right) is dropped from the VTU sequence;
4. the LLM runs through :func:`dymu.vtu_forward` (VTU attention at the full positions);
   ``last_hidden_state`` comes back at the stock shape [B, L, H] (every image position holds
   its merged row's state; padding slots hold 0), so the stock ``lm_head``, ``logits_to_keep``
   and loss code run unchanged;
5. with ``use_cache`` the cache returned is a :class:`dymu.MergedCache` (per layer the merged,
   unrotated K/V rows plus the map; RoPE is applied when a key is read), whatever cache the
   caller passed in.

Decode steps of ``generate`` after an image prompt (one new token, the merged cache) run every
layer's attention through ``dymu_kernels.vtu_decode_attention`` (:meth:`VLMPatch._decode`): the
image costs its merged rows in memory and in every step. Text-only calls without a merged cache
run the stock forward unchanged. Beam search (cache reordering) is not supported.

LLaVA-OneVision (anyres): the base image and every crop go through DToMe as separate images;
the layout steps of the stock model (crop grid permutation, unpadding, image-newline rows) are
run by the model's own ``pack_image_features`` on patch *indices* instead of features, so every
kept patch position maps to its crop's merged row and every newline is a row of its own. Steps
that cannot act on positions are refused: the ``anyres_max`` bilinear downscaling of a very
large image (detected exactly, not guessed) and video inputs (``pixel_values_videos``: pooling).

Limitations: inference only; one process-wide backend override (``backend=`` sets
DYMU_BACKEND for the encoder's duration: not thread-safe); ``vision_feature_layer`` must be
one int (a list concatenates layers that see different token sets); ``inputs_embeds`` and
``mm_encoder_outputs`` cannot replace ``input_ids`` / ``pixel_values`` in a call with images
(the placeholders must be found, the features must be merged); images in a prompt that
continues an existing cache are refused; ``output_hidden_states`` / ``output_attentions`` are
not produced on calls with images; ``generate`` with ``num_beams`` or ``num_return_sequences``
above 1 is not supported (transformers expands image features by placeholder counts, which merged
images no longer match).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .encoder_adapters import resolve
from .encoders import DToMeEncoder, normalize_thresholds
from .vtu_inputs import VTUImage, build_vtu_inputs, images_from_encoder
from .vtu_llm import _cache_kwarg, vtu_forward

__all__ = ["VLMPatch", "patch_vlm", "shipped_settings"]

SUPPORTED_VLMS = ("LlavaForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
# language_model class (what LLaVA holds) -> the causal-LM class vtu_forward takes
_LLM_CLASSES = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM", "Qwen2Model": "Qwen2ForCausalLM"}
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
SETTINGS = ("low", "mid", "high")

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, VLMPatch]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- thresholds


def shipped_settings(vision_model: nn.Module) -> Optional[Dict[str, str]]:
    """{setting: thresholds file} shipped for this vision tower, or None where none ship.

    Shipped today: DINOv2 ViT-S/14 (12 layers, hidden 384, patch 14), calibrated at 224 px.
    """
    parts = resolve(vision_model)
    config = parts.root.config
    if parts.kind == "dinov2" and len(parts.blocks) == 12 and config.hidden_size == 384 and config.patch_size == 14:
        return {s: os.path.join(DATA_DIR, f"dinov2_s14_224_{s}.json") for s in SETTINGS}
    return None


def _resolve_thresholds(thresholds, vision_model: nn.Module, num_layers: int) -> List[float]:
    if isinstance(thresholds, str):
        from .calibration import load_thresholds

        files = shipped_settings(vision_model)
        if thresholds not in SETTINGS:
            raise ValueError(f"thresholds given as a name must be one of {SETTINGS}, got {thresholds!r}")
        if files is None:
            raise ValueError(
                f"no thresholds ship for this vision tower ({type(vision_model).__name__}, {num_layers} layers): "
                "calibrate them with dymu.calibrate_thresholds and pass the list (or dymu.load_thresholds(path))"
            )
        return list(load_thresholds(files[thresholds], num_layers=num_layers))
    return normalize_thresholds(thresholds, num_layers)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _backend_env(backend: Optional[str]):
    """DYMU_BACKEND=backend for the duration (DToMeEncoder takes no backend argument)."""
    if backend is None:
        yield
        return
    previous = os.environ.get("DYMU_BACKEND")
    os.environ["DYMU_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DYMU_BACKEND", None)
        else:
            os.environ["DYMU_BACKEND"] = previous


def _causal_lm_view(language_model: nn.Module, text_config) -> nn.Module:
    """A ``<Arch>ForCausalLM`` whose ``.model`` is LLaVA's language model and whose head is the
    identity, so ``vtu_forward``'s "logits" are the final hidden states. Built on the meta
    device (no weights are allocated); it shares every module with the VLM."""
    import transformers

    cls = getattr(transformers, _LLM_CLASSES[type(language_model).__name__])
    with torch.device("meta"):
        view = cls(text_config)
    view.model = language_model
    view.lm_head = nn.Identity()
    return view.eval()


# ----------------------------------------------------------------------------- the handle


class VLMPatch:
    """What :func:`patch_vlm` returns: ``remove()`` restores the stock model; also a context
    manager (``with dymu.patch_vlm(model, ...):`` removes the patch on exit).

    Attributes:
        model: the patched VLM.
        thresholds: the per-layer DToMe thresholds in use.
        backend: the kernel backend forced for DToMe and VTU (None: the device's default).
        last_lengths: [N_img] int32 merged tokens per encoder image (crops count separately) of
            the last call with images, or None.
    """

    def __init__(self, model: nn.Module, kind: str, thresholds: List[float], backend: Optional[str]):
        self.model = model
        self.kind = kind  # "llava" | "onevision"
        self.thresholds = thresholds
        self.backend = backend
        self.last_lengths: Optional[torch.Tensor] = None
        inner = model.model
        self._inner = inner
        self._view = _causal_lm_view(inner.language_model, model.config.text_config)
        self._encoders: Dict[Tuple[int, bool], DToMeEncoder] = {}
        self._saved_forward = inner.__dict__.get("forward", _MISSING)
        self._saved_features = inner.__dict__.get("get_image_features", _MISSING)
        self.active = False

    # -- install / remove

    def _install(self) -> None:
        inner = self._inner

        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        stock_features = inspect.signature(inner.get_image_features)

        def get_image_features(*args, **kwargs):
            return self._image_features(stock_features, *args, **kwargs)

        get_image_features.__signature__ = stock_features  # generate() picks its inputs by name
        inner.forward = forward
        inner.get_image_features = get_image_features
        _ACTIVE[self.model] = self
        self.active = True

    def remove(self) -> None:
        """Restore the stock model (idempotent)."""
        if not self.active:
            return
        for name, saved in (("forward", self._saved_forward), ("get_image_features", self._saved_features)):
            if saved is _MISSING:
                self._inner.__dict__.pop(name, None)
            else:
                setattr(self._inner, name, saved)
        _ACTIVE.pop(self.model, None)
        self.active = False

    def __enter__(self) -> "VLMPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"VLMPatch({type(self.model).__name__}, active={self.active}, backend={self.backend})"

    # -- the encoder

    def _encoder(self, feature_layer: int, drop_first: bool) -> DToMeEncoder:
        key = (feature_layer, drop_first)
        if key not in self._encoders:
            tower = self._inner.vision_tower
            num_layers = len(resolve(tower).blocks)
            # hidden_states[k] of the stock tower: block outputs (no final norm), index k mod L+1
            layer = feature_layer % (num_layers + 1)
            protect = True if drop_first else None
            self._encoders[key] = DToMeEncoder(tower, self.thresholds, protect_cls=protect, output_layer=layer)
        return self._encoders[key]

    def _encode(self, pixel_values: torch.Tensor, feature_layer, strategy) -> List[VTUImage]:
        """Merged, projected tokens and patch maps of every image in ``pixel_values`` [N, 3, H, W]."""
        drop_first = strategy == "default"
        encoder = self._encoder(feature_layer, drop_first)
        tower_dtype = next(self._inner.vision_tower.parameters()).dtype
        with _backend_env(self.backend):
            out = encoder(pixel_values.to(tower_dtype))
        self.last_lengths = out.lengths - int(drop_first)
        projected = self._inner.multi_modal_projector(out.last_hidden_state)
        projected = projected.to(self._inner.get_input_embeddings().weight.dtype)
        return images_from_encoder(projected, out.pos_map, out.lengths, drop_cls=drop_first)

    # -- per-class image layouts

    def _llava_images(self, pixel_values, feature_layer, strategy, extra: Dict[str, Any]) -> List[VTUImage]:
        if extra.get("image_sizes") is not None:
            raise ValueError("patch_vlm: image_sizes (Pixtral-style variable-size images) is not supported for LLaVA")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [N_images, 3, H, W], got {tuple(pixel_values.shape)}")
        return self._encode(pixel_values, feature_layer, strategy)

    def _onevision_images(self, pixel_values, feature_layer, strategy, extra: Dict[str, Any]) -> List[VTUImage]:
        from transformers.models.llava_onevision import modeling_llava_onevision as ov

        inner, config = self._inner, self.model.config
        image_sizes = extra.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes (what its processor returns) with pixel_values")
        batch_num_images = extra.get("batch_num_images")
        if batch_num_images is None:
            need_patching = [True] * len(image_sizes)
        else:
            need_patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        num_crops = [
            ov.image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                         patch_size=config.vision_config.image_size) if patch else 1
            for size, patch in zip(image_sizes, need_patching)
        ]  # fmt: skip
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, num_crops)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        crops = self._encode(pixel_values, feature_layer, strategy)  # one VTUImage per crop
        num_patches = crops[0].pos_map.shape[0]
        # The stock layout steps, run on patch indices: channel 0 = global crop-patch index
        # (newline: -1), channel 1 = its square, so any interpolation (a weighted mean of
        # different indices) shows up as channel 1 != channel 0 ** 2.
        index_features, start = [], 0
        for n in num_crops:
            idx = torch.arange(start * num_patches, (start + n) * num_patches, dtype=torch.float64).view(n, num_patches, 1)
            index_features.append(torch.cat([idx, idx * idx], dim=-1))
            start += n
        newline = torch.tensor([-1.0, 1.0], dtype=torch.float64)
        aspect = getattr(config, "vision_aspect_ratio", None) or "anyres_max_9"
        packed, _ = inner.pack_image_features(index_features, image_sizes, image_newline=newline, vision_aspect_ratio=aspect)
        embed_dtype = inner.get_input_embeddings().weight.dtype
        image_newline = inner.image_newline.detach().to(embed_dtype)
        images, start = [], 0
        for i, (layout, n) in enumerate(zip(packed, num_crops)):
            source = layout[:, 0]
            if not bool((layout[:, 1] == source * source).all()) or not bool((source == source.round()).all()):
                raise NotImplementedError(
                    f"image {i}: its anyres layout interpolates patch features (the anyres_max downscaling of a large image), "
                    "which cannot act on token positions; DyMU cannot merge this image"
                )
            source = source.long()
            mine = crops[start:start + n]
            offsets = torch.tensor([0] + [c.tokens.shape[0] for c in mine]).cumsum(0)
            rows = torch.cat([c.tokens for c in mine] + [image_newline[None].expand(int((source < 0).sum()), -1)])
            crop_maps = torch.cat([c.pos_map.long().cpu() + offsets[k] for k, c in enumerate(mine)])  # [n * P]
            is_newline = source < 0
            local = (source - start * num_patches).clamp_min(0)
            pos_map = torch.where(is_newline, offsets[-1] + is_newline.long().cumsum(0) - 1, crop_maps[local])
            # unpadding can drop every patch of a merged row: drop such rows, renumber the rest
            covered = torch.zeros(rows.shape[0], dtype=torch.bool).index_fill_(0, pos_map, True)
            renumber = covered.long().cumsum(0) - 1
            device = rows.device
            images.append(VTUImage(rows[covered.to(device)], renumber[pos_map].to(device)))
            start += n
        return images

    # -- the patched forward

    def _images(self, pixel_values, vision_feature_layer, vision_feature_select_strategy, extra) -> List[VTUImage]:
        config = self.model.config
        layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = config.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        _check_feature_choice(layer, strategy)
        with torch.no_grad():
            if self.kind == "llava":
                return self._llava_images(pixel_values, layer, strategy, extra)
            return self._onevision_images(pixel_values, layer, strategy, extra)

    def _image_features(self, signature: inspect.Signature, *args, **kwargs):
        """The patched ``get_image_features`` (generate() calls it before the prefill): the merged
        rows of every image as ``pooler_output`` (a list of [n_k, H]) and their patch maps as
        ``dymu_images`` (a list of VTUImage), which the patched forward consumes."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop("kwargs", {}))
        pixel_values = arguments.pop("pixel_values")
        layer = arguments.pop("vision_feature_layer", None)
        strategy = arguments.pop("vision_feature_select_strategy", None)
        extra.update(arguments)
        images = self._images(pixel_values, layer, strategy, extra)
        out = BaseModelOutputWithPooling(pooler_output=[image.tokens for image in images])
        out.dymu_images = images
        return out

    def _forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        vision_feature_layer=None,
        vision_feature_select_strategy: Optional[str] = None,
        mm_encoder_outputs=None,
        **kwargs: Any,
    ):
        inner = self._inner
        if "past_key_values" in kwargs:
            legacy = kwargs.pop("past_key_values")
            cache = legacy if cache is None else cache
        if kwargs.get("pixel_values_videos") is not None or (mm_encoder_outputs or {}).get("video") is not None:
            raise NotImplementedError("patch_vlm: video features are pooled (bilinear) after the tower; pooling cannot act on token positions")
        encoded = (mm_encoder_outputs or {}).get("image")
        if pixel_values is None and encoded is None and _is_merged_cache(cache):
            return self._decode(input_ids, inputs_embeds, position_ids, cache, kwargs)
        if pixel_values is None and encoded is None:  # text only, or a decode step: the stock model
            stock = type(inner).forward
            if cache is not None:
                kwargs[_cache_kwarg(stock)] = cache  # "cache" in transformers 5.2x, "past_key_values" before
            if mm_encoder_outputs is not None:
                kwargs["mm_encoder_outputs"] = mm_encoder_outputs
            return stock(
                inner, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
            )  # fmt: skip
        if pixel_values is not None and encoded is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if encoded is not None and getattr(encoded, "dymu_images", None) is None:
            raise ValueError("patch_vlm: mm_encoder_outputs not made by the patched get_image_features cannot be merged; pass pixel_values")
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("patch_vlm: a call with images needs input_ids (to find the image placeholders), not inputs_embeds")
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag):
                raise ValueError(f"patch_vlm: {flag} is not available on a call with images")
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            raise ValueError("patch_vlm: images in a prompt that continues an existing cache are not supported")
        return_dict = kwargs.pop("return_dict", True)
        use_cache = kwargs.pop("use_cache", None)
        use_cache = self.model.config.text_config.use_cache if use_cache is None else use_cache
        if encoded is not None:
            images = encoded.dymu_images
        else:
            extra = {k: kwargs.get(k) for k in ("image_sizes", "batch_num_images")}
            images = self._images(pixel_values, vision_feature_layer, vision_feature_select_strategy, extra)
        with torch.no_grad():
            batch, slots, positions = self._vtu_batch(input_ids, attention_mask, position_ids, images)
            out = vtu_forward(self._view, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths,
                              position_ids=positions, use_cache=bool(use_cache), backend=self.backend)  # fmt: skip
            hidden = self._to_slots(out.logits, batch, slots, input_ids.shape[1])
            if use_cache:
                # The merged cache (dymu.MergedCache: merged unrotated K/V rows + the map) replaces
                # whatever cache the caller passed in; the decode steps read it (see _decode).
                cache = out.past_key_values
        result = _make_output(inner, hidden, cache if use_cache else None)
        return result if return_dict else result.to_tuple()

    def _vtu_batch(self, input_ids, attention_mask, position_ids, images: List[VTUImage]):
        """VTU inputs of the batch: per sequence its valid slots in order, text rows embedded,
        every image's placeholder run replaced by that image's merged rows and map."""
        config = self.model.config
        bsz, length = input_ids.shape
        device = input_ids.device
        embed = self._inner.get_input_embeddings()
        valid = torch.ones(bsz, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.to(device) != 0
        if valid.dim() != 2 or tuple(valid.shape) != (bsz, length):
            raise ValueError(f"attention_mask must be [B, L] = [{bsz}, {length}], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            positions = torch.arange(length, device=device).expand(bsz, length)
        else:
            positions = position_ids.to(device).long().expand(bsz, length) if position_ids.dim() == 2 else position_ids.to(device).long()[None].expand(bsz, length)
        image_token = config.image_token_id
        sequences, slots_per_seq, pos_per_seq = [], [], []
        next_image = 0
        for b in range(bsz):
            slots = valid[b].nonzero()[:, 0]
            ids = input_ids[b, slots]
            is_image = (ids == image_token).tolist()
            parts: List[Any] = []
            text_start, j = 0, 0
            while j < len(is_image):
                if not is_image[j]:
                    j += 1
                    continue
                if next_image >= len(images):
                    raise ValueError(
                        f"more image placeholder tokens than images ({len(images)}): sequence {b} position {int(slots[j])} "
                        "(generate with num_beams / num_return_sequences > 1 is not supported under patch_vlm)"
                    )
                image = images[next_image]
                need = image.pos_map.shape[0]
                if not all(is_image[j:j + need]) or j + need > len(is_image):
                    raise ValueError(
                        f"sequence {b}: image {next_image} needs {need} consecutive placeholder tokens (id {image_token}) "
                        f"from position {int(slots[j])}; the prompt does not hold them (does the processor match the model?)"
                    )
                parts.append(embed(ids[text_start:j]))
                parts.append(image)
                next_image += 1
                j += need
                text_start = j
            parts.append(embed(ids[text_start:]))
            if len(is_image) == 0:
                raise ValueError(f"sequence {b} has no valid token (attention_mask all 0)")
            sequences.append(parts)
            slots_per_seq.append(slots)
            pos_per_seq.append(positions[b, slots])
        if next_image != len(images):
            raise ValueError(f"{len(images)} images but placeholder tokens for {next_image}: image tokens and features do not match")
        batch = build_vtu_inputs(sequences)
        nf = batch.pos_map.shape[1]
        slot_index = torch.full((bsz, nf), -1, dtype=torch.long, device=device)
        pos = torch.zeros(bsz, nf, dtype=torch.long, device=device)
        for b in range(bsz):
            slot_index[b, : slots_per_seq[b].shape[0]] = slots_per_seq[b]
            pos[b, : pos_per_seq[b].shape[0]] = pos_per_seq[b]
        return batch, slot_index, pos

    @staticmethod
    def _to_slots(merged: torch.Tensor, batch, slots: torch.Tensor, length: int) -> torch.Tensor:
        """[B, Nu, H] merged rows -> [B, L, H] at the padded slots (each full position's row; 0 on padding)."""
        bsz, _, width = merged.shape
        valid = slots >= 0
        rows = torch.where(valid, batch.pos_map.long(), 0)
        full = merged.gather(1, rows[..., None].expand(*rows.shape, width))
        out = merged.new_zeros(bsz, length + 1, width)  # slot `length` is a sink for padded positions
        target = torch.where(valid, slots, length)
        out.scatter_(1, target[..., None].expand(*target.shape, width), torch.where(valid[..., None], full, 0))
        return out[:, :length]

    def _decode(self, input_ids, inputs_embeds, position_ids, cache, kwargs):
        """One decode step of ``generate`` from the merged cache the prefill returned: the new
        token's K/V become one new row and position of every layer, and attention runs through
        ``dymu_kernels.vtu_decode_attention`` (keys rotated when read). Positions are the ones
        the stock model uses (``position_ids`` from generate, else ``cache_position``)."""
        from .vtu_llm import decode_step

        new = input_ids if inputs_embeds is None else inputs_embeds
        if new is None or new.shape[1] != 1:
            raise NotImplementedError("patch_vlm: a step after an image prompt must add exactly one token (greedy/sampled generate)")
        if inputs_embeds is not None:
            raise NotImplementedError("patch_vlm: decode steps from the merged cache take input_ids, not inputs_embeds")
        if position_ids is not None:
            position = position_ids[:, -1].long()
        elif kwargs.get("cache_position") is not None:
            position = kwargs["cache_position"][-1:].long().expand(input_ids.shape[0])
        else:
            raise ValueError("patch_vlm: a decode step needs position_ids or cache_position")
        hidden = decode_step(self._view, cache, input_ids[:, -1], position, backend=self.backend)  # lm_head is Identity
        return _make_output(self._inner, hidden[:, None], cache)


def _is_merged_cache(cache) -> bool:
    return type(cache).__name__ == "MergedCache" and hasattr(cache, "attend")


_MISSING = object()


def _output_class(inner: nn.Module):
    if type(inner).__name__ == "LlavaOnevisionModel":
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModelOutputWithPast

        return LlavaOnevisionModelOutputWithPast
    from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

    return LlavaModelOutputWithPast


def _make_output(inner: nn.Module, hidden: torch.Tensor, cache):
    """The inner model's output dataclass (the cache field is ``cache`` in 5.2x, else past_key_values)."""
    cls = _output_class(inner)
    names = {f.name for f in dataclasses.fields(cls)}
    key = "cache" if "cache" in names else "past_key_values"
    return cls(last_hidden_state=hidden, **{key: cache})


def _check_feature_choice(feature_layer, strategy) -> None:
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise NotImplementedError(
            f"patch_vlm needs vision_feature_layer to be one int, got {feature_layer!r}: concatenating several layers "
            "would join hidden states of different merged token sets"
        )
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")


# ----------------------------------------------------------------------------- public API


def patch_vlm(
    model: nn.Module,
    thresholds: Union[str, float, Sequence[float], torch.Tensor, Any],
    *,
    backend: Optional[str] = None,
) -> VLMPatch:
    """Turn DyMU on in a HuggingFace LLaVA model: DToMe in its vision tower, VTU in its LLM.

    Args:
        model: ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout: CLIP, SigLIP or DINOv2
            tower; its int ``vision_feature_layer`` and ``vision_feature_select_strategy``; the
            projector as it is; Llama / Mistral / Qwen2 LLM) or
            ``LlavaOnevisionForConditionalGeneration`` (anyres crops merged independently).
        thresholds: the tower's per-layer DToMe thresholds: a list of one float per layer
            (+inf: never merges), a single float, what :func:`dymu.load_thresholds` returns, or a
            shipped setting name ``"low"`` / ``"mid"`` / ``"high"`` where thresholds ship for
            the tower (:func:`shipped_settings`; DINOv2 ViT-S/14 today).
        backend: force the kernel backend of both ops (None: the device's default).

    Returns:
        A :class:`VLMPatch`; ``handle.remove()`` (or leaving ``with``) restores the stock model.
        After the call, ``model(**inputs)`` and ``model.generate(**inputs)`` run DyMU on every
        call that carries ``pixel_values``: each image's placeholder tokens become its merged
        rows with their map, at the positions the stock model would use. Batches may mix
        prompts with 0, 1 or several images and pad on either side (attention_mask).

    Raises:
        TypeError: the model, its vision tower or its LLM is not supported. ValueError /
        NotImplementedError: bad thresholds, a multi-layer ``vision_feature_layer``, or a model
        that is already patched. All before anything on the model changes.
    """
    name = type(model).__name__
    if name not in SUPPORTED_VLMS:
        raise TypeError(f"patch_vlm supports {', '.join(SUPPORTED_VLMS)}; got {name}")
    if model in _ACTIVE:
        raise ValueError("this model is already patched by dymu.patch_vlm: call remove() on that handle first")
    inner = getattr(model, "model", None)
    for attr in ("vision_tower", "multi_modal_projector", "language_model"):
        if not hasattr(inner, attr):
            raise TypeError(f"{name}.model has no .{attr}: not a supported transformers layout")
    try:
        parts = resolve(inner.vision_tower)
    except TypeError as err:
        raise TypeError(f"patch_vlm: unsupported vision tower {type(inner.vision_tower).__name__}: {err}") from None
    llm_name = type(inner.language_model).__name__
    if llm_name not in _LLM_CLASSES:
        raise TypeError(f"patch_vlm: unsupported language model {llm_name}; supported: {', '.join(_LLM_CLASSES)}")
    config = model.config
    _check_feature_choice(config.vision_feature_layer, config.vision_feature_select_strategy)
    values = _resolve_thresholds(thresholds, inner.vision_tower, len(parts.blocks))
    if backend is not None:
        import dymu_kernels as dk

        if backend not in dk.backend_info():
            raise ValueError(f"backend must be None or one of {sorted(dk.backend_info())}, got {backend!r}")
    handle = VLMPatch(model, "llava" if name == SUPPORTED_VLMS[0] else "onevision", values, backend)
    handle._install()
    return handle

