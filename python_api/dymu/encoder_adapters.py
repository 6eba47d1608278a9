"""Per-model adapters: where each HF vision encoder keeps its embeddings, blocks and norms.

:class:`dymu.DToMeEncoder` runs its own block loop; this module tells it, for each supported
model, which submodules to call, so the loop reuses the model's own weights (layer norms,
q/k/v projections, MLP, LayerScale) without patching anything. Nothing here imports
transformers: models are recognised by class name and layout, so ``import dymu`` stays light.

Supported (transformers 5.17 - 5.24 layouts):

    model                      embeddings -> blocks -> final norm of last_hidden_state
    CLIPVisionModel            embeddings, pre_layrnorm | encoder.layers | none (post_layernorm
                               is applied to pooler_output only)
    SiglipVisionModel          embeddings               | encoder.layers | post_layernorm
    Dinov2Model                embeddings               | encoder.layer  | layernorm

plus any wrapper that holds one of them as ``.vision_model`` (CLIPModel, SiglipModel,
CLIPVisionModelWithProjection, LLaVA's vision tower) or ``.dinov2``, and the older
``CLIPVisionTransformer`` / ``SiglipVisionTransformer`` inner modules, which have the same layout.
DINOv2 attention comes in two layouts: ``attention.{q,k,v,o}_proj`` (5.2x) and
``attention.attention.{query,key,value}`` + ``attention.output.dense`` (older 5.x / 4.x).

Limitations: inference only (drop-path and dropout are not applied; call ``model.eval()``);
no DINOv2 register tokens (Dinov2WithRegistersModel) and no SigLIP2 (NaFlex) models.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

SUPPORTED_MODELS = "CLIPVisionModel, SiglipVisionModel or Dinov2Model (or a model holding one as .vision_model)"

_KINDS = {
    "CLIPVisionModel": "clip",
    "CLIPVisionTransformer": "clip",
    "SiglipVisionModel": "siglip",
    "SiglipVisionTransformer": "siglip",
    "Dinov2Model": "dinov2",
}


@dataclass
class BlockParts:
    """The submodules of one pre-norm ViT block, as the DToMe loop calls them.

    x = x + scale1(out(attention(norm1(x))))   (attention through q, k, v with num_heads heads)
    ... DToMe merge ...
    x = x + scale2(mlp(norm2(x)))
    """

    norm1: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    out: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    head_dim: int
    scale: float
    scale1: Optional[nn.Module]
    norm2: nn.Module
    mlp: nn.Module
    scale2: Optional[nn.Module]


@dataclass
class EncoderParts:
    """A resolved vision encoder: its kind, blocks and the calls around them."""

    kind: str  # "clip" | "siglip" | "dinov2"
    class_name: str
    root: nn.Module  # the module that owns embeddings / encoder / norms
    blocks: List[BlockParts]
    has_cls: bool
    embed: Callable[..., torch.Tensor]  # (pixel_values, interpolate_pos_encoding) -> [B, N0, D]
    final_norm: Optional[nn.Module]  # what the stock model applies to last_hidden_state
    pooler_norm: Optional[nn.Module]  # CLIP: post_layernorm on the CLS row (pooler_output)


def _unwrap(model: nn.Module) -> nn.Module:
    """Descend through wrappers (.vision_model, .dinov2) to a supported encoder module."""
    for _ in range(3):
        if type(model).__name__ in _KINDS:
            return model
        inner = getattr(model, "vision_model", None)
        if inner is None:
            inner = getattr(model, "dinov2", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _clip_like_block(layer: nn.Module) -> BlockParts:
    attn = layer.self_attn
    return BlockParts(
        norm1=layer.layer_norm1,
        q=attn.q_proj,
        k=attn.k_proj,
        v=attn.v_proj,
        out=attn.out_proj,
        num_heads=int(attn.num_heads),
        head_dim=int(attn.head_dim),
        scale=float(attn.scale),
        scale1=None,
        norm2=layer.layer_norm2,
        mlp=layer.mlp,
        scale2=None,
    )


def _dinov2_block(layer: nn.Module) -> BlockParts:
    attn = layer.attention
    if hasattr(attn, "q_proj"):  # transformers 5.2x layout
        q, k, v, out = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        heads, head_dim, scale = attn.num_attention_heads, attn.head_dim, attn.scaling
    else:  # attention.attention.{query,key,value} + attention.output.dense (+ dropout, eval no-op)
        inner, output = attn.attention, attn.output
        q, k, v = inner.query, inner.key, inner.value
        heads, head_dim, scale = inner.num_attention_heads, inner.attention_head_size, inner.scaling

        def out(h, _dense=output.dense, _drop=output.dropout):
            return _drop(_dense(h))

    return BlockParts(
        norm1=layer.norm1,
        q=q,
        k=k,
        v=v,
        out=out,
        num_heads=int(heads),
        head_dim=int(head_dim),
        scale=float(scale),
        scale1=layer.layer_scale1,
        norm2=layer.norm2,
        mlp=layer.mlp,
        scale2=layer.layer_scale2,
    )


def resolve(model: nn.Module) -> EncoderParts:
    """Recognise a supported HF vision encoder and collect its parts.

    Raises:
        TypeError: the model is not (and does not hold) a supported encoder.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vision_model must be a torch.nn.Module ({SUPPORTED_MODELS}), got {type(model).__name__}")
    root = _unwrap(model)
    name = type(root).__name__
    kind = _KINDS.get(name)
    if kind is None:
        raise TypeError(f"DToMeEncoder supports {SUPPORTED_MODELS}; got {type(model).__name__}")
    if kind == "clip":

        def embed(pixel_values, interpolate_pos_encoding=False):
            x = root.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            return root.pre_layrnorm(x)

        blocks = [_clip_like_block(layer) for layer in root.encoder.layers]
        return EncoderParts(kind, name, root, blocks, True, embed, None, root.post_layernorm)
    if kind == "siglip":

        def embed(pixel_values, interpolate_pos_encoding=False):
            return root.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

        blocks = [_clip_like_block(layer) for layer in root.encoder.layers]
        return EncoderParts(kind, name, root, blocks, False, embed, root.post_layernorm, None)

    def embed(pixel_values, interpolate_pos_encoding=False):  # DINOv2 always interpolates
        return root.embeddings(pixel_values)

    if getattr(root.config, "num_register_tokens", 0):
        raise TypeError("Dinov2 models with register tokens are not supported (expected a plain Dinov2Model)")
    blocks = [_dinov2_block(layer) for layer in root.encoder.layer]
    return EncoderParts(kind, name, root, blocks, True, embed, root.layernorm, None)
