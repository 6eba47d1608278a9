"""Pictures of what DToMe did: each merged group of patches painted with its mean colour.

This is the paper's qualitative figure: a photo where every group of patches that merged into
one token is filled with the group's average colour and outlined, so flat regions (sky, walls)
become large patches and detailed regions keep their grid.
"""

import os
from typing import List, Sequence, Tuple

import numpy as np
import torch


def group_image(image: np.ndarray, patch_groups: torch.Tensor, grid: int) -> np.ndarray:
    """Paint each merged group with its mean colour and draw group boundaries.

    Args:
        image: [H, W, 3] uint8 photo, H = W = grid * patch (the encoder's input crop).
        patch_groups: [grid * grid] int: the kept-token row of every patch in raster order
            (the encoder's pos_map without its CLS entry).
        grid: patches per side.

    Returns:
        [H, W, 3] uint8 picture.
    """
    h, w, _ = image.shape
    patch = h // grid
    groups = patch_groups.reshape(grid, grid).cpu().numpy()
    pixels = image[: grid * patch, : grid * patch].astype(np.float64)
    per_patch = pixels.reshape(grid, patch, grid, patch, 3).mean(axis=(1, 3))  # [grid, grid, 3]
    flat_groups = groups.reshape(-1)
    num = int(flat_groups.max()) + 1
    sums = np.zeros((num, 3))
    counts = np.zeros(num)
    np.add.at(sums, flat_groups, per_patch.reshape(-1, 3))
    np.add.at(counts, flat_groups, 1)
    colours = sums / np.maximum(counts, 1)[:, None]
    painted = colours[groups]  # [grid, grid, 3]
    out = np.repeat(np.repeat(painted, patch, axis=0), patch, axis=1)
    # boundaries: a pixel line wherever the neighbouring patch belongs to another group
    edge_v = groups[:, 1:] != groups[:, :-1]
    edge_h = groups[1:, :] != groups[:-1, :]
    for i, j in zip(*np.nonzero(edge_v)):
        out[i * patch : (i + 1) * patch, (j + 1) * patch - 1 : (j + 1) * patch + 1] = 255
    for i, j in zip(*np.nonzero(edge_h)):
        out[(i + 1) * patch - 1 : (i + 1) * patch + 1, j * patch : (j + 1) * patch] = 255
    return out.clip(0, 255).astype(np.uint8)


def save_grid(rows: Sequence[Tuple[str, List[Tuple[str, np.ndarray]]]], path: str, title: str = "") -> str:
    """Save a figure with one row per photo: [(row label, [(column label, image), ...]), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(cols) for _, cols in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.3 * len(rows)), squeeze=False)
    for r, (label, cols) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cols):
                name, img = cols[c]
                ax.imshow(img)
                ax.set_title(name, fontsize=8)
        axes[r][0].text(-0.08, 0.5, label, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    from .._atomic import atomic_write

    with atomic_write(path, "wb") as handle:  # a temporary file renamed over path: never half-written
        fig.savefig(handle, format=os.path.splitext(path)[1][1:] or "png", dpi=110)
    plt.close(fig)
    return path
