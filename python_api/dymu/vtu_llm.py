"""VTU (virtual token unmerging) inside HuggingFace Llama-family causal LMs.

The LLM receives merged rows (inputs_embeds [B, Nu, H]) plus a map from every full position to
its merged row (pos_map [B, Nf]). Norms, projections and MLPs act per row, so they run on the
Nu merged rows only; self-attention runs through ``dymu_kernels.vtu_attention``, which computes
causal attention over the Nf full positions (RoPE from the model's own rotary embedding at the
full positions) and averages the outputs back into merged rows (README, Semantics: VTU).

How it hooks in: for the duration of one call, every decoder layer's ``self_attn.forward`` is
replaced (an instance attribute, removed again in a ``finally``) by a function that projects
the merged rows to unrotated Q/K/V with the layer's own q/k/v projections (QKV bias included),
calls ``vtu_attention`` and applies the layer's o_proj. Everything else is the stock model:
its decoder layers, norms, MLPs, final norm and lm_head. (HF's attention-function registry is
not used because HF applies RoPE before calling the attention function; VTU needs unrotated
Q/K.) The model's config, its ``_attn_implementation`` and its classes are never touched.

Limitations:
- Supported: LlamaForCausalLM (SmolLM/SmolLM2 included), MistralForCausalLM, Qwen2ForCausalLM:
  rotate_half RoPE, GQA, optional QKV bias. Other classes are rejected before any work.
- Inference only: runs under ``torch.no_grad()``; the op layer has no autograd.
- Sliding-window attention is not implemented: a layer with a window smaller than Nf is an
  error (with Nf <= window the window changes nothing and the call is exact).
- Right padding only: positions >= full_lengths[b] are ignored. A 2-D ``attention_mask`` is
  accepted only as another way to give full_lengths (a prefix of ones per row).
- Not thread-safe on one model object (the per-layer patch is visible to other threads), and
  it replaces ``self_attn.forward`` so hooks installed by wrapping that attribute (accelerate
  device-map offloading) are bypassed during the call; plain module hooks still run.
- The KV cache returned with ``use_cache=True`` is by default a ``dymu.MergedCache``: the
  merged, unrotated K/V rows of every layer plus the map (keys are rotated when decode reads
  them, ``dymu_kernels.vtu_decode_attention``); ``dymu.generate`` decodes from it through the
  same per-layer patch. ``cache="full"`` gives HF's standard full-length cache instead
  (k_j = rope(K[u(j)], p_j), v_j = V[u(j)] for every full position j), decoded by the stock model.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch

import dymu_kernels as dk
from dymu_kernels._validate import values_checkable
from dymu_kernels.vtu.reference import apply_rope

__all__ = ["VTUCausalLMOutput", "decode_step", "generate", "supported_model_classes", "vtu_forward"]


# ----------------------------------------------------------------------------- model checks


def supported_model_classes() -> Tuple[type, ...]:
    """The HF causal-LM classes VTU supports (those importable from this transformers)."""
    import transformers

    names = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    return tuple(getattr(transformers, n) for n in names if hasattr(transformers, n))


def _check_model(model) -> None:
    classes = supported_model_classes()
    if not isinstance(model, classes):
        names = ", ".join(c.__name__ for c in classes)
        raise TypeError(
            f"VTU supports the HF causal LMs {names} (rotate_half RoPE, GQA, optional QKV bias); "
            f"got {type(model).__name__}"
        )
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "layers"):
        raise TypeError(f"{type(model).__name__} has no .model.rotary_emb / .model.layers: not a supported layout")
    for i, layer in enumerate(base.layers):
        attn = getattr(layer, "self_attn", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling") if not hasattr(attn, n)]
        if missing:
            raise TypeError(f"layer {i} self_attn lacks {missing}: not a Llama-style attention module")
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            raise TypeError(f"layer {i} normalises q/k (q_norm/k_norm): not supported by VTU here")


def _sliding_window(attn) -> Optional[int]:
    """The layer's sliding window (Qwen2: per-layer attribute; Mistral: config), or None."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def _cache_kwarg(fn) -> str:
    """transformers >= 5.2x calls the cache ``cache``; earlier 5.x ``past_key_values``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


# ----------------------------------------------------------------------------- input checks


@dataclass
class _Plan:
    """Normalised per-call inputs shared by every layer."""

    pos_map: torch.Tensor  # [B, Nf] int32/int64 as given
    index: torch.Tensor  # [B, Nf] int64, 0 where invalid
    valid: torch.Tensor  # [B, Nf] bool
    full_lengths: torch.Tensor  # [B] int32
    user_lengths: bool  # whether the caller gave lengths (a padding mask is needed in decode)
    position_ids: torch.Tensor  # [B, Nf] int64
    cos: torch.Tensor  # [B, Nf, D] float32 (the op's input)
    sin: torch.Tensor
    backend: Optional[str]
    validate: Optional[bool]
    merged_cache: Any = None  # a MergedCache to fill with the prompt's merged rows, or None


def _lengths_from_mask(attention_mask: torch.Tensor, bsz: int, nf: int, validate: Optional[bool]) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (bsz, nf):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a [B, Nf] = [{bsz}, {nf}] 0/1 tensor over full positions, got {shape}")
    keep = attention_mask != 0
    lengths = keep.sum(-1).to(torch.int32)
    if values_checkable(attention_mask, validate):
        prefix = torch.arange(nf, device=keep.device)[None, :] < lengths[:, None]
        if not bool((prefix == keep).all()):
            raise ValueError("attention_mask must be right padding (each row a prefix of ones); VTU takes no left padding")
    return lengths


def check_vtu_map(
    pos_map: torch.Tensor, full_lengths: torch.Tensor, num_merged: int, validate: Optional[bool] = None
) -> None:
    """Value checks of a VTU map (CPU tensors always; GPU tensors only when validating).

    Every valid entry (position < full_lengths[b]) must lie in [0, num_merged); every merged row
    up to the last one a sequence uses must be covered by at least one of its valid positions
    (rows after it are that sequence's padding), and some sequence must use row num_merged - 1.
    """
    if not values_checkable(pos_map, validate) or pos_map.numel() == 0:
        return
    bsz, nf = pos_map.shape
    valid = torch.arange(nf, device=pos_map.device)[None, :] < full_lengths[:, None].to(pos_map.device)
    bad = valid & ((pos_map < 0) | (pos_map >= num_merged))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"pos_map must map every valid position to a merged row in [0, {num_merged}), "
            f"got {int(pos_map[b, p])} at sequence {b}, position {p}"
        )
    index = torch.where(valid, pos_map, 0).long()
    counts = torch.zeros(bsz, num_merged, device=pos_map.device).scatter_add_(1, index, valid.float())
    covered = counts > 0
    hole = ~covered[:, :-1] & covered[:, 1:]
    if bool(hole.any()):
        b, r = (int(i) for i in hole.nonzero()[0])
        raise ValueError(
            f"pos_map does not cover merged row {r} of sequence {b} although it uses later rows: every merged "
            "row must have at least one full position (only rows after a sequence's last used row may be padding)"
        )
    if not bool(covered[:, -1].any()):
        raise ValueError(
            f"inputs_embeds has {num_merged} merged rows but no sequence maps a position to row {num_merged - 1}: "
            "every merged row must have at least one full position (trim the padding)"
        )


def _plan(
    model,
    inputs_embeds: torch.Tensor,
    pos_map: torch.Tensor,
    full_lengths: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    backend: Optional[str],
    validate: Optional[bool],
) -> _Plan:
    """Validate everything (before any work) and compute the full-position RoPE tables."""
    _check_model(model)
    hidden = model.config.hidden_size
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
        shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
        raise ValueError(f"inputs_embeds must be [B, Nu, H] merged rows with H = {hidden}, got {shape}")
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
    model_dtype = model.get_input_embeddings().weight.dtype
    if inputs_embeds.dtype != model_dtype:
        raise TypeError(f"inputs_embeds dtype {inputs_embeds.dtype} differs from the model's {model_dtype}: cast one of them")
    bsz, nu, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if nu < 1:
        raise ValueError("inputs_embeds must hold at least one merged row (Nu >= 1)")
    if not isinstance(pos_map, torch.Tensor) or pos_map.dim() != 2 or pos_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "pos_map must be a [B, Nf] int32/int64 tensor (merged row of every full position), got "
            + (f"{tuple(pos_map.shape)} {pos_map.dtype}" if isinstance(pos_map, torch.Tensor) else type(pos_map).__name__)
        )
    if pos_map.shape[0] != bsz:
        raise ValueError(f"pos_map has batch size {pos_map.shape[0]} but inputs_embeds has {bsz}")
    nf = pos_map.shape[1]
    if nf < 1:
        raise ValueError("pos_map must cover at least one full position (Nf >= 1)")
    if pos_map.device != device:
        raise ValueError(f"pos_map is on {pos_map.device}, inputs_embeds on {device}")
    if full_lengths is not None and attention_mask is not None:
        raise ValueError("give full_lengths or attention_mask (right padding over full positions), not both")
    user_lengths = full_lengths is not None or attention_mask is not None
    if attention_mask is not None:
        full_lengths = _lengths_from_mask(attention_mask, bsz, nf, validate)
    if full_lengths is not None:
        if not isinstance(full_lengths, torch.Tensor) or tuple(full_lengths.shape) != (bsz,) or full_lengths.is_floating_point():
            shape = tuple(full_lengths.shape) if isinstance(full_lengths, torch.Tensor) else type(full_lengths).__name__
            raise ValueError(f"full_lengths must be a [B] = [{bsz}] integer tensor, got {shape}")
        if full_lengths.device != device:
            raise ValueError(f"full_lengths is on {full_lengths.device}, inputs_embeds on {device}")
        if values_checkable(full_lengths, validate) and bool(((full_lengths < 0) | (full_lengths > nf)).any()):
            raise ValueError(f"full_lengths must lie in [0, Nf = {nf}], got {full_lengths.tolist()}")
        full_lengths = full_lengths.to(torch.int32)
    else:
        full_lengths = torch.full((bsz,), nf, dtype=torch.int32, device=device)
    if position_ids is None:
        position_ids = torch.arange(nf, device=device).expand(bsz, nf)
    else:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise TypeError("position_ids must be an integer tensor [Nf], [1, Nf] or [B, Nf]")
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[1] != nf or position_ids.shape[0] not in (1, bsz):
            raise ValueError(f"position_ids must be [Nf], [1, Nf] or [B, Nf] with B, Nf = {bsz}, {nf}, got {tuple(position_ids.shape)}")
        position_ids = position_ids.to(device=device, dtype=torch.long).expand(bsz, nf)
    for i, layer in enumerate(model.model.layers):
        window = _sliding_window(layer.self_attn)
        if window is not None and nf > window:
            raise ValueError(f"layer {i} uses sliding-window attention (window {window}) shorter than Nf = {nf}: not supported by VTU")
    check_vtu_map(pos_map, full_lengths, nu, validate)

    valid = torch.arange(nf, device=device)[None, :] < full_lengths[:, None]
    index = torch.where(valid, pos_map, 0).long()
    probe = inputs_embeds.new_empty(0, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(probe, position_ids)
    return _Plan(pos_map, index, valid, full_lengths, user_lengths, position_ids, cos.float(), sin.float(), backend, validate)


# ----------------------------------------------------------------------------- the per-layer patch


def _vtu_attention_forward(attn, plan: _Plan):
    """A replacement for ``attn.forward`` (LlamaAttention / MistralAttention / Qwen2Attention)."""

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        bsz, nu, _ = hidden_states.shape
        shape = (bsz, nu, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2).contiguous()  # [B, Hq, Nu, D]
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2).contiguous()  # [B, Hkv, Nu, D]
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2).contiguous()
        out = dk.vtu_attention(
            q, k, v, plan.cos, plan.sin, plan.pos_map,
            full_lengths=plan.full_lengths, scale=attn.scaling, backend=plan.backend, validate=plan.validate,
        )  # fmt: skip
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if plan.merged_cache is not None:
            plan.merged_cache.store_prompt(attn.layer_idx, k, v)  # unrotated merged rows
        elif cache is not None:
            # The standard full-length cache: what the stock layer would store for the
            # expanded sequence (RoPE in the activation dtype, as HF applies it).
            nf = plan.index.shape[1]
            gather = plan.index[:, None, :, None]
            k_full = k.gather(2, gather.expand(bsz, k.shape[1], nf, k.shape[3]))
            v_full = v.gather(2, gather.expand(bsz, v.shape[1], nf, v.shape[3]))
            cos = plan.cos[:, None].to(k.dtype)
            sin = plan.sin[:, None].to(k.dtype)
            k_full = apply_rope(k_full, cos, sin)
            keep = plan.valid[:, None, :, None]
            k_full = torch.where(keep, k_full, 0)
            v_full = torch.where(keep, v_full, 0)
            cache.update(k_full, v_full, attn.layer_idx)
        out = out.transpose(1, 2).reshape(bsz, nu, -1)
        return attn.o_proj(out), None

    return forward


_MISSING = object()  # module level: torch.compile cannot trace a bare object() call


def _decode_attention_forward(attn, plan: "_DecodePlan"):
    """A replacement for ``attn.forward`` in a decode step from a MergedCache."""

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        bsz, tq, _ = hidden_states.shape
        shape = (bsz, tq, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, Hq, 1, D], unrotated
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        out = plan.cache.attend(attn.layer_idx, q, k, v, attn.scaling, backend=plan.backend, validate=plan.validate)
        return attn.o_proj(out.transpose(1, 2).reshape(bsz, tq, -1)), None

    return forward


@dataclass
class _DecodePlan:
    cache: Any  # MergedCache
    backend: Optional[str]
    validate: Optional[bool]


@contextlib.contextmanager
def _patched_attention(model, plan, factory=None) -> Iterator[None]:
    """Swap every layer's self_attn.forward for the VTU one; restored on exit, errors included."""
    factory = _vtu_attention_forward if factory is None else factory
    saved: List[Tuple[torch.nn.Module, Any]] = []
    try:
        for layer in model.model.layers:
            attn = layer.self_attn
            saved.append((attn, attn.__dict__.get("forward", _MISSING)))
            attn.forward = factory(attn, plan)
        yield
    finally:
        for attn, previous in reversed(saved):
            if previous is _MISSING:
                attn.__dict__.pop("forward", None)
            else:
                attn.forward = previous


# ----------------------------------------------------------------------------- public API


@dataclass
class VTUCausalLMOutput:
    """What ``vtu_forward`` returns (shaped like HF's CausalLMOutputWithPast).

    logits: [B, Nu, V] over the merged rows (rows no valid position maps to are 0), or
        [B, 1, V] (the row of each sequence's last full position) with ``last_only=True``.
    past_key_values: with use_cache=True a ``dymu.MergedCache`` (default, ``cache="merged"``:
        the merged unrotated K/V rows [B, Hkv, Nu, D] of every layer plus the map) or, with
        ``cache="full"``, a ``transformers.DynamicCache`` holding the full-length rotated K/V of
        every layer ([B, Hkv, Nf, D]; positions >= full_lengths[b] are zero); None without
        use_cache. ``cache`` is the same object under transformers 5.2x's name.
    """

    logits: torch.Tensor
    past_key_values: Any = None

    @property
    def cache(self):
        return self.past_key_values

    def __getitem__(self, key):
        return getattr(self, key)


def _last_rows(plan: _Plan) -> torch.Tensor:
    """[B] int64: merged row holding each sequence's last valid full position."""
    last = (plan.full_lengths.long() - 1).clamp_min(0)
    return plan.index.gather(1, last[:, None])[:, 0]


def _cache_kind(cache: str) -> str:
    if cache not in ("merged", "full"):
        raise ValueError(f"cache must be 'merged' (merged rows + map) or 'full' (HF's full-length cache), got {cache!r}")
    return cache


def _run(model, inputs_embeds, plan: _Plan, use_cache: bool, last_only: bool, cache_kind: str = "merged") -> VTUCausalLMOutput:
    from transformers import DynamicCache

    from .merged_cache import MergedCache

    base = model.model
    kwargs = {"inputs_embeds": inputs_embeds, "use_cache": bool(use_cache) and cache_kind == "full"}
    cache = None
    if use_cache and cache_kind == "merged":
        cache = MergedCache()
        cache.set_prompt(plan.pos_map, plan.full_lengths, plan.cos, plan.sin)
        plan.merged_cache = cache
    elif use_cache:
        cache = DynamicCache(config=model.config)
        kwargs[_cache_kwarg(base.forward)] = cache
    with torch.no_grad(), _patched_attention(model, plan):
        hidden = base(**kwargs).last_hidden_state  # [B, Nu, H]
    with torch.no_grad():
        bsz, nu, width = hidden.shape
        if last_only:
            rows = _last_rows(plan)
            hidden = hidden.gather(1, rows[:, None, None].expand(bsz, 1, width))
            logits = model.lm_head(hidden)
        else:
            covered = torch.zeros(bsz, nu, device=hidden.device).scatter_add_(1, plan.index, plan.valid.float()) > 0
            logits = model.lm_head(hidden)
            logits = torch.where(covered[..., None], logits, 0)
    return VTUCausalLMOutput(logits=logits, past_key_values=cache)


def vtu_forward(
    model,
    inputs_embeds: torch.Tensor,
    pos_map: torch.Tensor,
    *,
    full_lengths: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    use_cache: bool = False,
    last_only: bool = False,
    cache: str = "merged",
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> VTUCausalLMOutput:
    """One VTU forward pass of a Llama-family causal LM over merged rows (inference only).

    Runs under ``torch.no_grad()``: the logits carry no autograd graph, even in grad mode
    (call it under ``torch.no_grad()`` / ``torch.inference_mode()``). Compiles with
    ``torch.compile(fullgraph=True)``; while compiling, the map's value checks are skipped.

    Args:
        model: LlamaForCausalLM (SmolLM included), MistralForCausalLM or Qwen2ForCausalLM.
        inputs_embeds: [B, Nu, H] merged rows in the model's dtype (text rows are ordinary
            token embeddings; image rows are merged image tokens after the projector). Rows of
            a sequence past the last row its map uses are padding.
        pos_map: [B, Nf] int32/int64: merged row in [0, Nu) of every full position. Every
            merged row a sequence uses must be covered (no holes); entries at positions
            >= full_lengths[b] are ignored (may be -1). ``build_vtu_inputs`` builds it.
        full_lengths: [B] int (default Nf): right padding; positions >= full_lengths[b] are
            neither queries nor keys.
        position_ids: [Nf], [1, Nf] or [B, Nf] int (default arange(Nf)): the RoPE position of
            every full position, fed to the model's own rotary embedding (RoPE scaling
            variants therefore work). The causal mask is on the index, not on these values.
        attention_mask: [B, Nf] 0/1 right-padding mask, an alternative to full_lengths.
        use_cache: also return a KV cache of the prompt (see ``cache``).
        cache: ``"merged"`` (default): a ``dymu.MergedCache`` of the merged, unrotated K/V rows
            plus the map; ``"full"``: HF's ``DynamicCache`` of the full-length rotated K/V.
        last_only: return logits only for the merged row holding each sequence's last full
            position ([B, 1, V]; what generation needs).
        backend, validate: passed to ``dymu_kernels.vtu_attention``; ``validate`` also enables
            the map's value checks here for GPU tensors (CPU tensors are always checked).

    Returns:
        VTUCausalLMOutput(logits [B, Nu, V] in the model's dtype, past_key_values).

    Raises:
        TypeError/ValueError before any work for an unsupported model, mismatched batch
        sizes, wrong shapes, or a map that leaves a merged row uncovered or points out of range.
    """
    kind = _cache_kind(cache)
    plan = _plan(model, inputs_embeds, pos_map, full_lengths, position_ids, attention_mask, backend, validate)
    return _run(model, inputs_embeds, plan, use_cache, last_only, kind)


def decode_step(model, cache, token: torch.Tensor, position: torch.Tensor, *, backend=None, validate=None) -> torch.Tensor:
    """One decode step from a ``dymu.MergedCache``: next-token logits [B, V].

    token: [B] int64 the tokens just generated; position: [B] int64 their RoPE position ids.
    Each layer appends the token's unrotated K/V as one new row and one new position (slot
    full_lengths[b]) and attends through ``dymu_kernels.vtu_decode_attention``.
    """
    base = model.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(token[:, None])  # [B, 1, H]
        cos, sin = base.rotary_emb(embeds.new_empty(0, dtype=torch.float32), position[:, None])
        cache.begin_token(cos[:, 0], sin[:, 0])
        with _patched_attention(model, _DecodePlan(cache, backend, validate), _decode_attention_forward):
            hidden = base(inputs_embeds=embeds, position_ids=position[:, None], use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1])


def _next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: Optional[int],
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """[B, V] logits -> [B] int64 tokens (argmax, or a sample at ``temperature`` from the top k)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(
    model,
    inputs_embeds: torch.Tensor,
    pos_map: torch.Tensor,
    max_new_tokens: int,
    *,
    full_lengths: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    cache: str = "merged",
    return_logits: bool = False,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
):
    """Generate tokens after a VTU prefill (inference only: runs under ``torch.no_grad()``, no
    gradient reaches the model).

    The prompt (merged rows + map, as for ``vtu_forward``) is prefilled with VTU attention,
    which also fills the KV cache; the first token comes from the logits of the merged row
    holding each sequence's last full position; then one token per step at RoPE positions
    position_ids[b, L_b - 1] + 1, + 2, ... (L_b = full_lengths[b]; with default position_ids:
    L_b, L_b + 1, ...). With ``cache="merged"`` (default) the cache is a ``dymu.MergedCache``
    (merged unrotated rows + map; each decoded token one new row and position) and every layer
    decodes through ``dymu_kernels.vtu_decode_attention``; with ``cache="full"`` it is HF's
    full-length cache and the stock model decodes (padded slots masked out).

    Args:
        max_new_tokens: number of tokens to generate (>= 1).
        full_lengths: [B] int in [1, Nf] (default Nf).
        do_sample: sample instead of greedy argmax; ``temperature`` > 0 divides the logits and
            ``top_k`` keeps the k best before sampling; ``generator`` seeds ``torch.multinomial``.
        eos_token_id: a sequence that emits it is finished; later steps emit ``pad_token_id``
            (default eos_token_id) for it, and generation stops early once every sequence is
            finished (that check reads one flag from the device per step).
        cache: ``"merged"`` or ``"full"`` (see above).
        return_logits: also return the next-token logits of every step.
        position_ids, backend, validate: as in ``vtu_forward``.

    Returns:
        [B, T] int64 generated token ids (T <= max_new_tokens; prompt not included); with
        ``return_logits`` a tuple (tokens, logits [B, T, V]: the logits each token was chosen from).
    """
    kind = _cache_kind(cache)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    plan = _plan(model, inputs_embeds, pos_map, full_lengths, position_ids, None, backend, validate)
    if values_checkable(plan.full_lengths, validate) and bool((plan.full_lengths < 1).any()):
        raise ValueError(f"generate needs full_lengths >= 1 for every sequence, got {plan.full_lengths.tolist()}")
    if pad_token_id is None:
        pad_token_id = eos_token_id

    prefill = _run(model, inputs_embeds, plan, use_cache=True, last_only=True, cache_kind=kind)
    cache, logits = prefill.past_key_values, prefill.logits[:, -1]
    bsz, nf = plan.index.shape
    last = (plan.full_lengths.long() - 1).clamp_min(0)[:, None]
    next_position = plan.position_ids.gather(1, last)[:, 0] + 1  # [B]
    mask = plan.valid.long() if plan.user_lengths else None  # padded cache slots masked out
    cache_kw = _cache_kwarg(model.forward)
    finished = torch.zeros(bsz, dtype=torch.bool, device=logits.device)
    tokens: List[torch.Tensor] = []
    step_logits: List[torch.Tensor] = []
    with torch.no_grad():
        for step in range(max_new_tokens):
            token = _next_token(logits, do_sample, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, pad_token_id), token)
                finished = finished | (token == eos_token_id)
            tokens.append(token)
            if return_logits:
                step_logits.append(logits)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            if kind == "merged":
                logits = decode_step(model, cache, token, next_position + step, backend=backend, validate=validate)
                continue
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=(next_position + step)[:, None],
                use_cache=True,
                **{cache_kw: cache},
            )
            logits = out.logits[:, -1]
    if return_logits:
        return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)
    return torch.stack(tokens, dim=1)
