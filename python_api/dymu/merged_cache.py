"""A compact KV cache for decoding after a VTU prefill: merged, unrotated rows plus a map.

After a VTU prefill every merged image row stands for several full positions. HF's standard
cache stores one rotated K/V per full position; this cache stores what is distinct:

- per layer, the unrotated K/V rows as projected, ``[B, Hkv, R, D]`` in the activation dtype:
  the R = Nu merged rows of the prompt, then one new row per decoded token;
- once for all layers, the row of every cached position ``pos_map [B, P]`` (int32, 4 bytes per
  position), ``full_lengths [B]`` (positions >= full_lengths[b] do not exist) and the RoPE
  tables of the positions, ``cos/sin [B, P, D]`` fp32 (row j = the rotation of position j, from
  the model's own rotary embedding at that position's position id).

Keys are rotated when they are read, by ``dymu_kernels.vtu_decode_attention``: decode attention
reads R rows instead of P positions. Decoded tokens of a right-padded batch go to slot
full_lengths[b] of their sequence (overwriting its padding), so slot index = causal index.

It subclasses ``transformers.Cache`` so it can travel where a cache is expected, but the stock
attention layers cannot use it (they want rotated keys): ``update`` raises. Decode with
``dymu.generate`` (``cache="merged"``, the default), or call ``dymu.decode_step``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from transformers.cache_utils import Cache

import dymu_kernels as dk

__all__ = ["MergedCache"]


class MergedCache(Cache):
    """Merged-row KV cache of a VTU prompt (see the module docstring for the layout).

    Attributes:
        keys, values: per layer [B, Hkv, R, D] unrotated rows (activation dtype).
        pos_map: [B, P] int32 row of every cached position (-1 or stale beyond full_lengths).
        full_lengths: [B] int32 positions that exist per sequence.
        cos, sin: [B, P, D] float32 RoPE tables of the cached positions.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.pos_map: Optional[torch.Tensor] = None
        self.full_lengths: Optional[torch.Tensor] = None
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None
        self._q_positions: Optional[torch.Tensor] = None  # [B, 1] slot of the token being decoded

    # ------------------------------------------------------------------ filling

    def set_prompt(self, pos_map: torch.Tensor, full_lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The prompt's map [B, Nf], lengths [B] and RoPE tables [B, Nf, D] (shared by all layers)."""
        valid = torch.arange(pos_map.shape[1], device=pos_map.device)[None, :] < full_lengths[:, None]
        self.pos_map = torch.where(valid, pos_map, -1).to(torch.int32).contiguous()
        self.full_lengths = full_lengths.to(torch.int32).clone()
        self.cos = cos.float().contiguous()
        self.sin = sin.float().contiguous()

    def store_prompt(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The prompt's unrotated merged rows of one layer: k, v [B, Hkv, Nu, D]."""
        if layer_idx != len(self.keys):
            raise RuntimeError(f"MergedCache: layers must be stored in order, got layer {layer_idx} after {len(self.keys)}")
        self.keys.append(k.contiguous())
        self.values.append(v.contiguous())

    def begin_token(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Open one new position per sequence (slot full_lengths[b]) for the next decoded token.

        cos, sin: [B, D] RoPE of the token's position id. Every layer then appends one row with
        :meth:`attend`. Returns the slots [B, 1] int32 (the queries' positions).
        """
        if self.pos_map is None:
            raise RuntimeError("MergedCache is empty: fill it with a VTU prefill (dymu.vtu_forward(use_cache=True))")
        bsz = self.pos_map.shape[0]
        slot = self.full_lengths.long()[:, None]  # [B, 1]
        new_row = self.keys[0].shape[2] if self.keys else 0
        pad = self.pos_map.new_full((bsz, 1), -1)
        self.pos_map = torch.cat([self.pos_map, pad], dim=1).scatter_(1, slot, new_row)
        width = cos.shape[-1]
        table_pad = self.cos.new_zeros(bsz, 1, width)
        index = slot[..., None].expand(bsz, 1, width)
        self.cos = torch.cat([self.cos, table_pad], dim=1).scatter_(1, index, cos.float()[:, None])
        self.sin = torch.cat([self.sin, table_pad], dim=1).scatter_(1, index, sin.float()[:, None])
        self._q_positions = slot.to(torch.int32)
        self.full_lengths = self.full_lengths + 1
        return self._q_positions

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        backend: Optional[str] = None,
        validate: Optional[bool] = None,
    ) -> torch.Tensor:
        """Append this layer's row of the open token and attend: q [B, Hq, 1, D], k, v
        [B, Hkv, 1, D] unrotated. Returns [B, Hq, 1, D] in q.dtype."""
        if self._q_positions is None:
            raise RuntimeError("MergedCache.attend: call begin_token first")
        self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k.to(self.keys[layer_idx].dtype)], dim=2)
        self.values[layer_idx] = torch.cat([self.values[layer_idx], v.to(self.values[layer_idx].dtype)], dim=2)
        if validate:
            return dk.vtu_decode_attention(
                q, self.keys[layer_idx], self.values[layer_idx], self.cos, self.sin, self.pos_map, self._q_positions,
                full_lengths=self.full_lengths, scale=scale, backend=backend, validate=validate,
            )  # fmt: skip
        # The cache keeps the op's normalised layout itself (int32 map and lengths, fp32 [B, P, D]
        # tables, slots in range by construction; the prompt's map was validated by the prefill),
        # so per-layer decode calls skip the wrapper's value checks: about 10 small tensor ops per
        # layer and step, more than the attention itself for small models on a CPU.
        from dymu_kernels.api import _run

        return _run(
            "vtu_decode_attention", q.device, backend, q, self.keys[layer_idx], self.values[layer_idx],
            self.cos, self.sin, self.pos_map, self._q_positions, self.full_lengths, float(scale),
        )  # fmt: skip

    # ------------------------------------------------------------------ HF Cache interface

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        if self.pos_map is None:
            return "MergedCache(empty)"
        k = self.keys[0] if self.keys else None
        rows = k.shape[2] if k is not None else 0
        return f"MergedCache(layers={len(self.keys)}, batch={self.pos_map.shape[0]}, rows={rows}, positions={self.pos_map.shape[1]}, nbytes={self.nbytes()})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached positions P (the map's width; shorter sequences end at full_lengths[b])."""
        return 0 if self.pos_map is None else int(self.pos_map.shape[1])

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError(
            "MergedCache holds unrotated merged rows read through a map; HF's stock attention cannot "
            "decode from it. Use dymu.generate(..., cache='merged') or dymu.decode_step, "
            "or dymu.vtu_forward(..., cache='full') for a standard DynamicCache."
        )

    # ------------------------------------------------------------------ memory

    def nbytes_breakdown(self) -> Dict[str, int]:
        """Bytes held: {"kv_rows", "map" (pos_map + full_lengths), "rope" (cos/sin tables)}."""
        kv = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        index = sum(t.numel() * t.element_size() for t in (self.pos_map, self.full_lengths) if t is not None)
        rope = sum(t.numel() * t.element_size() for t in (self.cos, self.sin) if t is not None)
        return {"kv_rows": kv, "map": index, "rope": rope}

    def nbytes(self) -> int:
        """Total bytes this cache holds (K/V rows of every layer, the map, the RoPE tables)."""
        return sum(self.nbytes_breakdown().values())


def full_cache_nbytes(cache) -> int:
    """Bytes of the K/V tensors of a standard HF cache (DynamicCache), for comparison."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
