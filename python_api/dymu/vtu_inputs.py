"""Build VTU inputs (merged rows + full-length map) from text embeddings and merged images.

A sequence is a list of parts in prompt order. A part is either
- a text block: a float tensor [T, H] of token embeddings; each of its T positions is its own
  merged row (text is never merged), or
- an image: ``VTUImage(tokens [n, H], pos_map [N0])``, the image's n merged tokens (already in
  the LLM's embedding space, i.e. after the projector) and, for each of its N0 original
  patches in raster order, the merged token in [0, n) it went into (what DToMeEncoder returns,
  without the CLS entry). The image occupies N0 full positions, in raster order.

``build_vtu_inputs`` concatenates the parts of each sequence and pads the batch on the right:
merged rows to Nu_max (zeros), full positions to Nf_max (map entry -1), which is exactly what
``vtu_forward`` / ``generate`` take. All tensor work stays on the parts' device; sizes come
from shapes, so there is no host sync (value checks aside: CPU tensors are always checked,
GPU tensors only with ``validate=True`` or DYMU_VALIDATE=1).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from dymu_kernels._validate import values_checkable

__all__ = ["VTUImage", "VTUInputs", "build_vtu_inputs", "images_from_encoder"]


class VTUImage(NamedTuple):
    """One merged image: tokens [n, H] float and pos_map [N0] int (patch -> row in [0, n))."""

    tokens: torch.Tensor
    pos_map: torch.Tensor


class VTUInputs(NamedTuple):
    """Batched VTU inputs.

    inputs_embeds: [B, Nu_max, H] merged rows (zeros past merged_lengths[b]).
    pos_map: [B, Nf_max] int32, merged row of every full position (-1 past full_lengths[b]).
    full_lengths: [B] int32 full positions per sequence.
    merged_lengths: [B] int32 merged rows per sequence.
    """

    inputs_embeds: torch.Tensor
    pos_map: torch.Tensor
    full_lengths: torch.Tensor
    merged_lengths: torch.Tensor


Part = Union[torch.Tensor, VTUImage, tuple]


def _check_image(where: str, image: VTUImage, validate: Optional[bool]) -> VTUImage:
    tokens, pos_map = image
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.is_floating_point():
        raise ValueError(f"{where}: image tokens must be a float [n, H] tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if (
        not isinstance(pos_map, torch.Tensor)
        or pos_map.dim() != 1
        or pos_map.dtype not in (torch.int32, torch.int64)
        or pos_map.numel() == 0
    ):
        raise ValueError(f"{where}: image pos_map must be a non-empty [N0] int32/int64 tensor, got {getattr(pos_map, 'shape', type(pos_map))}")
    if pos_map.device != tokens.device:
        raise ValueError(f"{where}: image pos_map is on {pos_map.device}, its tokens on {tokens.device}")
    n = tokens.shape[0]
    if n < 1:
        raise ValueError(f"{where}: an image needs at least one merged token")
    if values_checkable(pos_map, validate):
        if bool(((pos_map < 0) | (pos_map >= n)).any()):
            raise ValueError(f"{where}: image pos_map values must lie in [0, {n}) (n merged tokens), got {pos_map.min().item()}..{pos_map.max().item()}")
        counts = torch.zeros(n, device=pos_map.device).scatter_add_(0, pos_map.long(), torch.ones(pos_map.shape, device=pos_map.device))
        if bool((counts == 0).any()):
            row = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"{where}: merged token {row} has no patch mapping to it: every merged token must be covered")
    return VTUImage(tokens, pos_map)


def build_vtu_inputs(sequences: Sequence[Sequence[Part]], *, validate: Optional[bool] = None) -> VTUInputs:
    """Concatenate text blocks and merged images into batched VTU inputs.

    Args:
        sequences: B sequences; each a non-empty list of parts in prompt order: a text block
            [T, H] float tensor (T >= 0), or an image ``VTUImage(tokens [n, H], pos_map [N0])``
            (a plain (tokens, pos_map) tuple works too). All parts share H, dtype and device.
        validate: value checks of image maps on GPU tensors (CPU tensors are always checked).

    Returns:
        VTUInputs(inputs_embeds [B, Nu_max, H], pos_map [B, Nf_max] int32, full_lengths [B]
        int32, merged_lengths [B] int32). For a sequence whose parts have merged rows
        n_1, n_2, ... (T for text) and full sizes f_1, f_2, ... (T for text, N0 for images),
        part k's rows start at sum_{j<k} n_j and its positions at sum_{j<k} f_j; a text
        position maps to its own row, an image position p to offset + pos_map[p].

    Example (LLaVA-style prompt: text, one image, text)::

        embed = model.get_input_embeddings()
        image = dymu.VTUImage(projector(merged_tokens), image_pos_map)
        batch = dymu.build_vtu_inputs([[embed(ids_before), image, embed(ids_after)]])
        out = dymu.vtu_forward(model, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths)
    """
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, (list, tuple)) or len(sequences) == 0:
        raise ValueError("sequences must be a non-empty list of sequences (each a list of parts)")
    ref: Optional[torch.Tensor] = None
    checked: List[List[Part]] = []
    for b, parts in enumerate(sequences):
        if isinstance(parts, torch.Tensor) or not isinstance(parts, (list, tuple)) or len(parts) == 0:
            raise ValueError(f"sequence {b} must be a non-empty list of parts (text [T, H] tensors or VTUImage)")
        row: List[Part] = []
        for k, part in enumerate(parts):
            where = f"sequence {b}, part {k}"
            if isinstance(part, torch.Tensor):
                if part.dim() != 2 or not part.is_floating_point():
                    raise ValueError(f"{where}: a text block must be a float [T, H] tensor, got {tuple(part.shape)} {part.dtype}")
                tokens = part
            elif isinstance(part, tuple) and len(part) == 2:
                part = _check_image(where, VTUImage(*part), validate)
                tokens = part.tokens
            else:
                raise TypeError(f"{where}: expected a [T, H] tensor or a VTUImage(tokens, pos_map), got {type(part).__name__}")
            if ref is None:
                ref = tokens
            elif tokens.shape[1] != ref.shape[1] or tokens.dtype != ref.dtype or tokens.device != ref.device:
                raise ValueError(
                    f"{where}: H / dtype / device {tokens.shape[1]} / {tokens.dtype} / {tokens.device} differ from the "
                    f"first part's {ref.shape[1]} / {ref.dtype} / {ref.device}"
                )
            row.append(part)
        checked.append(row)

    device, hidden = ref.device, ref.shape[1]
    rows_per_seq, maps_per_seq = [], []
    for parts in checked:
        rows, maps, offset = [], [], 0
        for part in parts:
            if isinstance(part, torch.Tensor):
                rows.append(part)
                maps.append(torch.arange(offset, offset + part.shape[0], device=device, dtype=torch.int32))
                offset += part.shape[0]
            else:
                rows.append(part.tokens)
                maps.append(part.pos_map.to(torch.int32) + offset)
                offset += part.tokens.shape[0]
        rows_per_seq.append(torch.cat(rows, dim=0))
        maps_per_seq.append(torch.cat(maps, dim=0))
    merged = [r.shape[0] for r in rows_per_seq]
    full = [m.shape[0] for m in maps_per_seq]
    if min(full) < 1:
        raise ValueError(f"every sequence needs at least one position, got full lengths {full}")
    bsz = len(checked)
    inputs_embeds = torch.zeros(bsz, max(merged), hidden, dtype=ref.dtype, device=device)
    pos_map = torch.full((bsz, max(full)), -1, dtype=torch.int32, device=device)
    for b in range(bsz):
        inputs_embeds[b, : merged[b]] = rows_per_seq[b]
        pos_map[b, : full[b]] = maps_per_seq[b]
    full_lengths = torch.tensor(full, dtype=torch.int32, device=device)
    merged_lengths = torch.tensor(merged, dtype=torch.int32, device=device)
    return VTUInputs(inputs_embeds, pos_map, full_lengths, merged_lengths)


def images_from_encoder(
    tokens: torch.Tensor, pos_map: torch.Tensor, lengths: torch.Tensor, *, drop_cls: bool = False
) -> List[VTUImage]:
    """Split a DToMe encoder's padded batch into per-image ``VTUImage``s.

    Args:
        tokens: [N_img, N', D] merged tokens (rows >= lengths[i] are padding).
        pos_map: [N_img, N0] int: row of every original token (CLS included when the encoder
            has one).
        lengths: [N_img] int: kept tokens per image.
        drop_cls: drop the CLS token (row 0 and position 0; DToMe never merges a protected
            CLS), as LLaVA's default feature selection does.

    Returns a list of N_img ``VTUImage(tokens [n_i, D], pos_map [N0 (- 1)])``. Reads lengths on
    the host (one sync). Apply the projector to each image's tokens before
    ``build_vtu_inputs`` (it acts per row, so it runs on merged tokens unchanged).
    """
    if tokens.dim() != 3 or pos_map.dim() != 2 or lengths.dim() != 1:
        raise ValueError(
            f"expected tokens [N_img, N', D], pos_map [N_img, N0], lengths [N_img]; got "
            f"{tuple(tokens.shape)}, {tuple(pos_map.shape)}, {tuple(lengths.shape)}"
        )
    if not (tokens.shape[0] == pos_map.shape[0] == lengths.shape[0]):
        raise ValueError(
            f"batch sizes differ: tokens {tokens.shape[0]}, pos_map {pos_map.shape[0]}, lengths {lengths.shape[0]}"
        )
    images = []
    for i, n in enumerate(lengths.tolist()):
        t, m = tokens[i, :n], pos_map[i]
        if drop_cls:
            if values_checkable(m, None) and bool((m[1:] == 0).any()):
                raise ValueError(f"image {i}: a patch maps to the CLS row 0; cannot drop CLS (was it protected?)")
            t, m = t[1:], m[1:] - 1
        images.append(VTUImage(t, m))
    return images
