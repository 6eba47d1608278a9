"""Per-layer DToMe threshold calibration (paper eq. 4) and the thresholds file.

calibrate_thresholds: for every batch, block l computes the best-edge scores node_max of its
sources, takes the batch threshold tau_l = dk.batch_threshold(node_max, r_l) (the (B*r_l + 1)-th
largest score, clamped at >= 0) and merges with it, so later blocks see the token sets that
inference will see. The result is the mean of tau_l over batches, kept as a float64 sum and a
count (the official bf16 running mean drifts). Under torch.distributed (initialised), sums and
counts are all-reduced, so every rank returns the mean over every rank's batches.

Thresholds file (JSON, UTF-8), written by :func:`save_thresholds`:

    {
      "format": "dymu-thresholds",      # fixed tag
      "version": 1,
      "encoder_name": "openai/clip-vit-large-patch14-336",
      "num_layers": 24,                  # len(thresholds) == len(r_per_layer)
      "thresholds": [0.83, ..., null],   # float per layer; null = +inf (the layer never merges)
      "r_per_layer": [21, ..., 0],       # merges per image each layer was calibrated for
      "num_images": 1000                 # images seen by the calibration (all ranks)
    }
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch

import dymu_kernels as dk
from dymu_kernels._backends import select as select_backend

from ._atomic import write_text
from .encoders import DToMeEncoder, normalize_thresholds

FORMAT_TAG = "dymu-thresholds"
FORMAT_VERSION = 1


@dataclass
class CalibratedThresholds:
    """Per-layer thresholds with where they came from. Behaves as a sequence of floats.

    Attributes:
        thresholds: one float per layer (+inf: never merges).
        r_per_layer: merges per image each layer was calibrated for (None if unknown).
        num_images: images the calibration saw (None if unknown).
        encoder_name: free-form name of the encoder (None if unknown).
    """

    thresholds: List[float]
    r_per_layer: Optional[List[int]] = None
    num_images: Optional[int] = None
    encoder_name: Optional[str] = None

    def __len__(self) -> int:
        return len(self.thresholds)

    def __iter__(self):
        return iter(self.thresholds)

    def __getitem__(self, index):
        return self.thresholds[index]


def normalize_r(r: Union[int, Sequence[int]], num_layers: int) -> List[int]:
    """r as one int >= 0 per layer (an int applies to every layer)."""
    if isinstance(r, bool):
        raise TypeError("r must be an int or a list of ints (merges per image per layer), got a bool")
    if isinstance(r, int):
        values = [r] * num_layers
    else:
        try:
            values = list(r)
        except TypeError:
            raise TypeError(f"r must be an int or a list of {num_layers} ints (merges per image per layer), got {r!r}") from None
        if len(values) != num_layers:
            raise ValueError(f"r must have one value per layer: expected {num_layers}, got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"r[{i}] must be an int >= 0 (merges per image), got {v!r}")
    return values


def _pixels(batch) -> torch.Tensor:
    """The pixel tensor of a batch given as a tensor, a dict with 'pixel_values', or a tuple."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        if "pixel_values" not in batch:
            raise ValueError("a batch given as a mapping must hold 'pixel_values' [B, C, H, W]")
        return batch["pixel_values"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"each batch must be a [B, C, H, W] tensor, a dict with 'pixel_values' or a tuple (pixels, ...), got {type(batch).__name__}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def calibrate_thresholds(
    vision_model: torch.nn.Module,
    batches: Iterable,
    r: Union[int, Sequence[int]],
    *,
    protect_cls: Optional[bool] = None,
    progress: bool = True,
    interpolate_pos_encoding: bool = False,
) -> CalibratedThresholds:
    """Calibrate one DToMe threshold per layer so that layer l merges about r_l tokens per image.

    Args:
        vision_model: a model :class:`dymu.DToMeEncoder` accepts (CLIP / SigLIP / DINOv2 vision).
        batches: iterable of pixel batches: [B, C, H, W] tensors on the model's device, dicts
            with ``pixel_values``, or tuples whose first item is the pixels. Batch sizes may differ
            (each batch counts once in the mean).
        r: merges per image per layer: an int (every layer) or a list of one int per layer;
            0 means the layer never merges (threshold +inf).
        protect_cls: as in DToMeEncoder (None: the model's default).
        progress: show a tqdm bar (rank 0 only under torch.distributed).

    Returns:
        CalibratedThresholds(thresholds: list of float per layer, r_per_layer, num_images), the
        same on every rank. Layers with r_l = 0 get +inf.

    Inference only: runs under ``torch.no_grad()`` (no gradient reaches the model). The scores,
    the batch threshold and the merge use one backend (the default for the model's device, or
    DYMU_BACKEND), so a threshold never admits more merges than it was computed for.

    Under torch.distributed (initialised), every rank must call this with the same r and
    model; each rank's per-layer sums, counts and image counts are all-reduced (SUM). Host
    syncs: the encoder's one per merging layer (shrinking), plus one at the end.
    """
    encoder = DToMeEncoder(vision_model, math.inf, protect_cls=protect_cls)
    r_layers = normalize_r(r, encoder.num_layers)
    device = next(vision_model.parameters()).device
    sums = torch.zeros(encoder.num_layers, dtype=torch.float64, device=device)
    counts = torch.zeros(encoder.num_layers, dtype=torch.float64, device=device)
    images = torch.zeros((), dtype=torch.float64, device=device)
    protect = encoder.protect_cls
    # Scores, threshold and the merge that applies it all from one backend: the threshold lies
    # exactly on one score of the batch, and backends may round that score differently by an
    # ulp (README, Semantics: ties), which would admit r + 1 merges.
    backend = select_backend("dtome_merge", device, None)

    def tau_fn(layer, metric, lengths):
        if r_layers[layer] == 0:
            return None
        node_max, _ = dk.bipartite_similarity(metric, lengths, protect_first=protect, backend=backend)
        # r above the M sources left: no (B*r + 1)-th score, threshold 0 (batch_threshold
        # rejects r > M, so clamp to M, which gives that 0).
        tau = dk.batch_threshold(node_max, min(r_layers[layer], node_max.shape[1]), backend=backend)
        sums[layer] += tau.to(torch.float64)
        counts[layer] += 1
        return tau

    show = progress and (not _distributed() or torch.distributed.get_rank() == 0)
    iterator = batches
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrating DToMe thresholds", unit="batch")
    for batch in iterator:
        pixels = _pixels(batch)
        encoder.run(pixels, tau_fn, interpolate_pos_encoding=interpolate_pos_encoding)
        images += pixels.shape[0]
    if _distributed():
        stats = torch.cat([sums, counts, images[None]])  # one all-reduce, on the model's device
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
        n = encoder.num_layers
        sums, counts, images = stats[:n], stats[n : 2 * n], stats[2 * n]
    sums, counts = sums.cpu().tolist(), counts.cpu().tolist()
    num_images = int(images.item())
    if num_images == 0:
        raise ValueError("calibrate_thresholds got no batches (expected at least one batch of images)")
    thresholds = [math.inf if rl == 0 else s / c for rl, s, c in zip(r_layers, sums, counts)]
    config = getattr(encoder.model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(encoder.model).__name__
    return CalibratedThresholds(thresholds, r_layers, num_images, name)


def save_thresholds(
    path: Union[str, os.PathLike],
    thresholds,
    *,
    encoder_name: str,
    r_per_layer: Optional[Sequence[int]] = None,
    num_images: Optional[int] = None,
) -> None:
    """Write per-layer thresholds to a JSON file (the format is in this module's docstring).

    Args:
        path: file to write (replaced atomically; its folder must exist).
        thresholds: one float per layer (+inf written as null), or a CalibratedThresholds.
        encoder_name: name of the encoder they were calibrated on (e.g. a hub id or folder).
        r_per_layer: merges per image per layer (default: thresholds.r_per_layer if present).
        num_images: images seen (default: thresholds.num_images if present).
    """
    if r_per_layer is None:
        r_per_layer = getattr(thresholds, "r_per_layer", None)
    if num_images is None:
        num_images = getattr(thresholds, "num_images", None)
    if hasattr(thresholds, "thresholds"):
        thresholds = thresholds.thresholds
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().cpu().double().reshape(-1).tolist()
    if isinstance(thresholds, (int, float)):
        raise TypeError("thresholds must be a list of one float per layer, got a single number")
    thresholds = list(thresholds)
    values = normalize_thresholds(thresholds, len(thresholds))
    num_layers = len(values)
    if any(t == -math.inf for t in values):
        raise ValueError("thresholds of -inf cannot be saved (the file stores finite values and null for +inf)")
    if r_per_layer is not None:
        r_per_layer = normalize_r(list(r_per_layer), num_layers)
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0):
        raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
    if not isinstance(encoder_name, str):
        raise TypeError(f"encoder_name must be a str, got {type(encoder_name).__name__}")
    data = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "encoder_name": encoder_name,
        "num_layers": num_layers,
        "thresholds": [None if t == math.inf else t for t in values],
        "r_per_layer": r_per_layer,
        "num_images": num_images,
    }
    body = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in data.items())
    write_text(path, "{\n" + body + "\n}\n")  # a temporary file renamed over path: never half-written


def load_thresholds(path: Union[str, os.PathLike], num_layers: Optional[int] = None) -> CalibratedThresholds:
    """Read a thresholds file written by :func:`save_thresholds`.

    Args:
        num_layers: the encoder's block count; a file for a different count is a ValueError.

    Returns:
        CalibratedThresholds (usable directly as DToMeEncoder's ``thresholds``).
    """
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a dymu thresholds file (invalid JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        raise ValueError(f"{path}: not a dymu thresholds file (expected \"format\": \"{FORMAT_TAG}\")")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported thresholds file version {data.get('version')!r} (expected {FORMAT_VERSION})")
    raw = data.get("thresholds")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: \"thresholds\" must be a non-empty list")
    values = [math.inf if t is None else float(t) for t in raw]
    if data.get("num_layers") not in (None, len(values)):
        raise ValueError(f"{path}: num_layers {data.get('num_layers')} does not match {len(values)} thresholds")
    if num_layers is not None and num_layers != len(values):
        raise ValueError(
            f"{path} holds thresholds for {len(values)} layers, but the encoder has {num_layers} layers "
            f"(calibrated for {data.get('encoder_name')!r})"
        )
    values = normalize_thresholds(values, len(values))
    r_per_layer = data.get("r_per_layer")
    if r_per_layer is not None:
        r_per_layer = normalize_r(list(r_per_layer), len(values))
    return CalibratedThresholds(values, r_per_layer, data.get("num_images"), data.get("encoder_name"))
