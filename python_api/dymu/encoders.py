"""DToMe inside HF vision encoders: :class:`DToMeEncoder`.

The encoder runs its own loop over the wrapped model's blocks (see ``encoder_adapters``),
reusing the model's norms, projections, MLPs and LayerScale. In every block:

    h = norm1(x); q, k, v = projections(h)
    a = softmax(q k^T * scale + log(size)_key) v      proportional attention (size 0 masks padding)
    x = x + out(a)                                    (DINOv2: x + layer_scale1(out(a)))
    x, size, lengths, pos_map = dk.dtome_merge(x, metric = mean_heads(k), ...)   if tau_l is finite
    x = x + mlp(norm2(x))                             (DINOv2: x + layer_scale2(mlp(norm2(x))))

The merge metric is the key tensor of that same attention call, averaged over heads (no second
QKV projection). Attention goes through ``torch.nn.functional.scaled_dot_product_attention``
whatever ``config._attn_implementation`` says, with the log-size bias as an additive mask in
the activation dtype (bf16 rounds log(size) to about 3 significant digits, as the official code).

Layouts: ``layout="packed"`` (the default) keeps the kept tokens of all images concatenated,
``x`` [T, D] with ``cu_seqlens`` [B + 1] int32 (flash-attention varlen style), so every block's
projections and MLP run on the rows really kept and the attention is
``dk.proportional_attention_varlen`` (block-diagonal, log-size bias read per key);
``dk.dtome_merge_varlen`` merges in place of ``dk.dtome_merge``. ``layout="padded"`` is the
previous path: a [B, N, D] batch padded to the longest image, SDPA with a dense float mask.
Before the first merge both run the same unmasked SDPA on the full [B, N0, D] batch.

Token order: a merge step reorders rows to [unmerged even rows ; odd rows] (README, Semantics: DToMe
rule 6) even when nothing merges; ``pos_map`` gives the row of every original token, so
``out.last_hidden_state.gather(1, pos_map)`` lays the tokens out in the original order again.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

import dymu_kernels as dk

from .encoder_adapters import BlockParts, EncoderParts, resolve

ThresholdsLike = Union[float, Sequence[float], torch.Tensor]

# tau_fn(layer, metric [B, N, C], lengths [B] int32) -> threshold (float / 0-dim tensor) or None
# (None: this layer does not merge).
TauFn = Callable[[int, torch.Tensor, torch.Tensor], Optional[Union[float, torch.Tensor]]]


@dataclass
class DToMeEncoderOutput:
    """What :class:`DToMeEncoder` returns (B images, N0 tokens in, N' rows out).

    Attributes:
        last_hidden_state: [B, N', D] in the model dtype: what the stock model returns there
            (``last_hidden_state`` for output_layer=-1, ``hidden_states[k]`` otherwise), over the
            kept tokens in merge order; rows >= lengths[b] are zero.
        sizes: [B, N'] float32, how many original tokens each row stands for (0 on padding);
            sums to N0 per image.
        lengths: [B] int32 kept tokens per image.
        pos_map: [B, N0] int32, the row in [0, lengths[b]) of every original token (CLS
            included, in the stock model's token order).
        layer_lengths: [num_blocks_run, B] int32, kept tokens per image after each block.
        pooler_output: [B, D] for CLIP (post_layernorm of the CLS row) and DINOv2 (the CLS row),
            output_layer=-1 with the CLS protected; None otherwise (SigLIP's attention-pooling
            head is not run).
        num_syncs: host synchronisations this forward made (see :class:`DToMeEncoder`).
        cu_seqlens, packed_hidden_state, packed_sizes, packed_pos_map: the packed form
            (``layout="packed"`` only, else None): image b owns rows cu_seqlens[b] ..
            cu_seqlens[b+1] of packed_hidden_state [T', D] and packed_sizes [T'] float32 (rows
            past cu_seqlens[B] are zero); packed_pos_map [B, N0] int32 is the packed row of
            every original token (= pos_map + cu_seqlens[b]).
    """

    last_hidden_state: torch.Tensor
    sizes: torch.Tensor
    lengths: torch.Tensor
    pos_map: torch.Tensor
    layer_lengths: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    num_syncs: int = 0
    cu_seqlens: Optional[torch.Tensor] = None
    packed_hidden_state: Optional[torch.Tensor] = None
    packed_sizes: Optional[torch.Tensor] = None
    packed_pos_map: Optional[torch.Tensor] = None

    @property
    def valid_mask(self) -> torch.Tensor:
        """[B, N'] bool: row i of image b is a kept token (i < lengths[b])."""
        n = self.last_hidden_state.shape[1]
        return torch.arange(n, device=self.lengths.device) < self.lengths[:, None]


def normalize_thresholds(thresholds: ThresholdsLike, num_layers: int) -> List[float]:
    """Per-layer thresholds as a list of ``num_layers`` floats (+inf: the layer never merges).

    Accepts a float (every layer), a sequence or 1-D tensor of one value per layer, or an object
    with a ``thresholds`` attribute (what :func:`dymu.load_thresholds` returns).

    Raises:
        ValueError: wrong length or a NaN value. TypeError: not numbers.
    """
    if hasattr(thresholds, "thresholds") and not isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.thresholds
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() > 1:
            raise ValueError(f"thresholds must be a float or a 1-D list of {num_layers} floats, got shape {tuple(thresholds.shape)}")
        thresholds = thresholds.detach().cpu().double().reshape(-1).tolist() if thresholds.dim() == 1 else float(thresholds)
    if isinstance(thresholds, bool):
        raise TypeError("thresholds must be numbers, got a bool")
    if isinstance(thresholds, (int, float)):
        values = [float(thresholds)] * num_layers
    else:
        try:
            values = [float(t) for t in thresholds]
        except (TypeError, ValueError) as err:
            raise TypeError(f"thresholds must be a float or a list of {num_layers} floats (one per layer): {err}") from None
    if len(values) != num_layers:
        raise ValueError(f"thresholds must have one value per layer: expected {num_layers}, got {len(values)}")
    bad = [i for i, t in enumerate(values) if math.isnan(t)]
    if bad:
        raise ValueError(f"thresholds must not be NaN (layers {bad}); use +inf for a layer that never merges")
    return values


def proportional_attention(
    block: BlockParts, h: torch.Tensor, log_size: Optional[torch.Tensor]
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Multi-head self-attention of one block with the log-size key bias.

    Args:
        h: [B, N, D] normed tokens.
        log_size: [B, N] float32 log(size) of every key (-inf on padding), or None when every
            size is 1 (no bias, so SDPA may pick its fastest kernel).

    Returns:
        (attention output [B, N, heads*head_dim] before the output projection,
        metric [B, N, head_dim]: the keys averaged over heads).
    """
    bsz, n, _ = h.shape
    shape = (bsz, n, block.num_heads, block.head_dim)
    q = block.q(h).view(shape).transpose(1, 2)
    k = block.k(h).view(shape).transpose(1, 2)
    v = block.v(h).view(shape).transpose(1, 2)
    bias = None if log_size is None else log_size.to(q.dtype)[:, None, None, :]
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=block.scale)
    return a.transpose(1, 2).reshape(bsz, n, -1), k.mean(dim=1)


class DToMeEncoder(nn.Module):
    """Dynamic token merging (DToMe) inside an HF vision encoder, batched, on the device.

    Args:
        vision_model: ``CLIPVisionModel``, ``SiglipVisionModel`` or ``Dinov2Model`` (or a model
            holding one as ``.vision_model``, e.g. CLIPModel or LLaVA's vision tower). Its
            weights are used as they are (not copied, not patched); call ``.eval()`` on it.
        thresholds: one float per block (len = num_hidden_layers; a single float applies to
            every block): a token merges at block l when its best cosine score beats
            thresholds[l] strictly. +inf: the block never merges (and costs nothing extra).
            Also accepts what :func:`dymu.load_thresholds` returns.
        protect_cls: keep row 0 out of merging. None: True where the model has a CLS token
            (CLIP, DINOv2), False for SigLIP.
        output_layer: -1 returns what the stock ``last_hidden_state`` holds (final norm included
            where the stock model applies one: SigLIP's post_layernorm, DINOv2's layernorm; CLIP
            applies none there). Any other k in [-(L+1), L] returns what the stock
            ``hidden_states[k]`` holds and does not run later blocks (LLaVA reads -2); note
            ``hidden_states[L]`` is the last block's output *without* the final norm.
        shrink: after every merging block, slice the batch so later blocks run on fewer rows:
            packed, to the new total of kept tokens; padded, to the new longest image. This reads
            the new total and longest length to the host: one sync per merging block run.
            ``shrink=False`` defers: the forward makes no host sync at all (CUDA-graph and
            torch.compile friendly) and every tensor keeps its static capacity (B * N0 packed
            rows, N0 padded rows per image); trim the output with ``lengths.max()`` yourself.
        layout: ``"packed"`` (default): the kept tokens of all images concatenated (see the
            module doc), so the work follows the tokens each image keeps; ``"padded"``: the
            batch padded to its longest image (kept for comparison). Same outputs (the packed
            form comes in addition); hidden states agree to rounding.

    Host syncs per forward: ``shrink=True``: the number of blocks run whose threshold is finite;
    ``shrink=False``: zero. (On CPU a "sync" is just a read.) ``out.num_syncs`` reports it.

    Calling it: ``encoder(pixel_values [B, 3, H, W], interpolate_pos_encoding=False)`` returns a
    :class:`DToMeEncoderOutput`. Inference only: it runs under ``torch.no_grad()``, so no
    gradient reaches the weights or the pixels even in grad mode (use it under
    ``torch.no_grad()`` / ``torch.inference_mode()``; the ops warn once when given inputs that
    require grad).
    With every threshold +inf the output equals the stock model's (same token order).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        thresholds: ThresholdsLike,
        *,
        protect_cls: Optional[bool] = None,
        output_layer: int = -1,
        shrink: bool = True,
        layout: str = "packed",
    ):
        super().__init__()
        parts = resolve(vision_model)
        num_layers = len(parts.blocks)
        self.thresholds = normalize_thresholds(thresholds, num_layers)
        if isinstance(output_layer, bool) or not isinstance(output_layer, int) or not -(num_layers + 1) <= output_layer <= num_layers:
            raise ValueError(
                f"output_layer must be an int in [-{num_layers + 1}, {num_layers}] (hidden_states index of a "
                f"{num_layers}-block encoder; -1: last_hidden_state), got {output_layer!r}"
            )
        if protect_cls is not None and not isinstance(protect_cls, bool):
            raise TypeError(f"protect_cls must be None or a bool, got {protect_cls!r}")
        self._parts = parts
        self.model = parts.root  # registered, so .to(device) moves the weights
        self.kind = parts.kind
        self.num_layers = num_layers
        self.has_cls = parts.has_cls
        self.protect_cls = parts.has_cls if protect_cls is None else protect_cls
        self.output_layer = output_layer
        self.shrink = bool(shrink)
        if layout not in ("packed", "padded"):
            raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
        self.layout = layout

    @property
    def num_blocks_run(self) -> int:
        """How many blocks a forward runs (output_layer=-1: all)."""
        if self.output_layer == -1:
            return self.num_layers
        return self.output_layer % (self.num_layers + 1)

    def forward(self, pixel_values: torch.Tensor, *, interpolate_pos_encoding: bool = False) -> DToMeEncoderOutput:
        """Encode ``pixel_values`` [B, C, H, W] with the fixed thresholds; see the class doc."""
        taus = self.thresholds

        def tau_fn(layer, metric, lengths):
            return None if taus[layer] == math.inf else taus[layer]

        return self._loop(pixel_values, tau_fn, interpolate_pos_encoding, needs_metric=False)

    @torch.no_grad()
    def run(
        self,
        pixel_values: torch.Tensor,
        tau_fn: TauFn,
        *,
        interpolate_pos_encoding: bool = False,
    ) -> DToMeEncoderOutput:
        """The block loop with a caller-supplied threshold per block (calibration uses this).

        ``tau_fn(layer, metric, lengths)`` gets the block's merge metric [B, N, C] and the
        current lengths [B] int32, and returns that block's threshold (float or 0-dim / [B]
        tensor), or None for no merge. In the packed layout the metric is unpacked to
        [B, N0, C] (rows >= lengths zero) for tau_fn.
        """
        return self._loop(pixel_values, tau_fn, interpolate_pos_encoding, needs_metric=True)

    def _loop(self, pixel_values, tau_fn: TauFn, interpolate_pos_encoding: bool, needs_metric: bool):
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a [B, C, H, W] tensor, got {got}")
        parts: EncoderParts = self._parts
        x = parts.embed(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if self.layout == "packed":
            return self._packed(x, tau_fn, needs_metric)
        bsz, n0, _ = x.shape
        device = x.device
        size = torch.ones(bsz, n0, dtype=torch.float32, device=device)
        lengths = torch.full((bsz,), n0, dtype=torch.int32, device=device)
        pos_map = torch.arange(n0, dtype=torch.int32, device=device).expand(bsz, n0).contiguous()
        log_size = None  # None until the first merge: every size is 1, nothing is padded
        layer_lengths = []
        num_syncs = 0
        for index in range(self.num_blocks_run):
            block = parts.blocks[index]
            attn, metric = proportional_attention(block, block.norm1(x), log_size)
            attn = block.out(attn)
            if block.scale1 is not None:
                attn = block.scale1(attn)
            x = x + attn
            tau = tau_fn(index, metric, lengths)
            if tau is not None:
                res = dk.dtome_merge(x, metric, size, lengths, tau, pos_map=pos_map, protect_first=self.protect_cls)
                x, size, lengths, pos_map = res.x, res.size, res.lengths, res.pos_map
                if self.shrink:
                    new_max = int(lengths.max())  # the one explicit host sync of this block
                    num_syncs += 1
                    x, size = x[:, :new_max].contiguous(), size[:, :new_max].contiguous()
                log_size = size.log()  # log 0 = -inf masks padded keys
            h = block.mlp(block.norm2(x))
            if block.scale2 is not None:
                h = block.scale2(h)
            x = x + h
            layer_lengths.append(lengths)
        pooler = None
        if self.output_layer == -1:
            if parts.final_norm is not None:
                x = parts.final_norm(x)
            if self.protect_cls and parts.has_cls:
                pooler = x[:, 0] if parts.pooler_norm is None else parts.pooler_norm(x[:, 0])
        if log_size is not None:  # something went through a merge: zero the padded rows
            valid = torch.arange(x.shape[1], device=device) < lengths[:, None]
            x = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=device))
        stacked = torch.stack(layer_lengths) if layer_lengths else torch.empty(0, bsz, dtype=torch.int32, device=device)
        return DToMeEncoderOutput(x, size, lengths, pos_map, stacked, pooler, num_syncs)

    @torch.no_grad()
    def _packed(self, x: torch.Tensor, tau_fn: TauFn, needs_metric: bool) -> DToMeEncoderOutput:
        """The block loop on the packed layout: x [T, D] with cu_seqlens [B + 1]."""
        parts: EncoderParts = self._parts
        bsz, n0, dim = x.shape
        device = x.device
        x = x.reshape(bsz * n0, dim)
        cu = torch.arange(0, (bsz + 1) * n0, n0, dtype=torch.int32, device=device)
        size = torch.ones(bsz * n0, dtype=torch.float32, device=device)
        pos_map = (torch.arange(n0, dtype=torch.int32, device=device) + cu[:-1, None]).contiguous()
        merged_once = False  # until the first merge: every size is 1, the batch is [B, N0] exactly
        longest = n0
        layer_lengths = []
        num_syncs = 0
        for index in range(self.num_blocks_run):
            block = parts.blocks[index]
            attn, metric = packed_attention(block, block.norm1(x), size, cu, bsz if not merged_once else None, longest)
            attn = block.out(attn)
            if block.scale1 is not None:
                attn = block.scale1(attn)
            x = x + attn
            lengths = cu[1:] - cu[:-1]
            tau = tau_fn(index, unpack(metric, cu, n0) if needs_metric else metric, lengths)
            if tau is not None:
                res = dk.dtome_merge_varlen(x, metric, size, cu, tau, pos_map=pos_map, protect_first=self.protect_cls,
                                            max_seqlen=longest)
                x, size, cu, pos_map = res.x, res.size, res.cu_seqlens, res.pos_map
                merged_once = True
                if self.shrink:
                    # the one explicit host sync of this block: the new total and longest image
                    total, longest = torch.stack([cu[-1], (cu[1:] - cu[:-1]).max()]).tolist()
                    num_syncs += 1
                    x, size = x[:total], size[:total]
            h = block.mlp(block.norm2(x))
            if block.scale2 is not None:
                h = block.scale2(h)
            x = x + h
            layer_lengths.append(cu[1:] - cu[:-1])
        lengths = cu[1:] - cu[:-1]
        if self.output_layer == -1 and parts.final_norm is not None:
            x = parts.final_norm(x)
        valid = torch.arange(x.shape[0], device=device) < cu[-1]
        x = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=device))
        pooler = None
        if self.output_layer == -1 and self.protect_cls and parts.has_cls:
            cls = x[cu[:-1].long()]
            pooler = cls if parts.pooler_norm is None else parts.pooler_norm(cls)
        stacked = torch.stack(layer_lengths) if layer_lengths else torch.empty(0, bsz, dtype=torch.int32, device=device)
        width = longest if self.shrink else n0
        return DToMeEncoderOutput(
            unpack(x, cu, width), unpack(size, cu, width), lengths, pos_map - cu[:-1, None], stacked, pooler,
            num_syncs, cu, x, size, pos_map,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, num_layers={self.num_layers}, protect_cls={self.protect_cls}, "
            f"output_layer={self.output_layer}, shrink={self.shrink}, layout={self.layout}"
        )


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Packed rows [T, ...] -> padded [B, width, ...]: row l of image b is packed row
    cu_seqlens[b] + l for l < its length, zero elsewhere (no host sync)."""
    local = torch.arange(width, device=packed.device)
    rows = cu_seqlens[:-1, None].long() + local
    valid = rows < cu_seqlens[1:, None]
    out = packed[rows.clamp_max(packed.shape[0] - 1)]
    mask = valid.reshape(*valid.shape, *([1] * (packed.dim() - 1)))
    return torch.where(mask, out, torch.zeros((), dtype=packed.dtype, device=packed.device))


def packed_attention(
    block: BlockParts, h: torch.Tensor, size: torch.Tensor, cu_seqlens: torch.Tensor, uniform_batch: Optional[int],
    max_seqlen: Optional[int] = None,
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Self-attention of one block on the packed layout, with the log-size key bias.

    Args:
        h: [T, D] normed packed tokens; size [T] float32; cu_seqlens [B + 1] int32.
        uniform_batch: B when the rows are exactly B images of T / B tokens of size 1 (before
            the first merge): then plain SDPA on the [B, T / B] batch runs, without a bias.
        max_seqlen: a host bound on every image's length (sizes the Triton grid), or None.

    Returns:
        (attention output [T, heads*head_dim] before the output projection, metric [T, head_dim]).
    """
    rows = h.shape[0]
    shape = (rows, block.num_heads, block.head_dim)
    q, k, v = block.q(h).view(shape), block.k(h).view(shape), block.v(h).view(shape)
    if uniform_batch is not None:
        split = (uniform_batch, rows // uniform_batch, block.num_heads, block.head_dim)
        qb, kb, vb = (t.view(split).transpose(1, 2) for t in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, scale=block.scale)
        a = a.transpose(1, 2).reshape(rows, -1)
    else:
        a = dk.proportional_attention_varlen(q, k, v, size, cu_seqlens, scale=block.scale, max_seqlen=max_seqlen)
        a = a.reshape(rows, -1)
    return a, k.mean(dim=1)
