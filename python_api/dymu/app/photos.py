"""Real photos that ship inside installed packages (no downloads).

The demo, calibration and slow tests use these: a dozen real photographs bundled in the wheels
of scikit-image (``skimage/data``), scikit-learn (``sklearn/datasets/images``) and matplotlib
(``mpl-data/sample_data``). Files are read directly from the installed package folders with
Pillow, so nothing here can trigger a network fetch (``skimage.data`` downloads some of its
datasets on demand; only the files shipped in its wheel are listed here).

    load_photos(names=None) -> [(name, PIL.Image RGB)]
    center_crop(image, size=224) -> PIL.Image        shorter side to ``size``, centre crop
    jpeg_size(image, size=224, quality=75) -> int    bytes of the JPEG-encoded crop
    jpeg_sizes(photos, size=224) -> {name: bytes}    an image-complexity proxy per photo

Licences: scikit-image's sample images are public domain / CC0 (see skimage/data/README.txt),
scikit-learn's china.jpg and flower.jpg are CC BY 2.0, matplotlib's grace_hopper.jpg is public
domain.
"""

from __future__ import annotations

import importlib.util
import io
import os

# name -> (package, path inside the package folder, what it shows)
PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png", "astronaut Eileen Collins, portrait"),
    "camera": ("skimage", "data/camera.png", "man with a camera on a tripod (greyscale)"),
    "chelsea": ("skimage", "data/chelsea.png", "Chelsea the cat"),
    "coffee": ("skimage", "data/coffee.png", "cup of coffee on a saucer"),
    "rocket": ("skimage", "data/rocket.jpg", "rocket on the launch pad"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "Hubble deep field, galaxies on black"),
    "retina": ("skimage", "data/retina.jpg", "human retina, fundus photograph"),
    "immunohistochemistry": ("skimage", "data/ihc.png", "stained tissue, microscope"),
    "motorcycle": ("skimage", "data/motorcycle_left.png", "motorcycle in a studio (stereo left)"),
    "coins": ("skimage", "data/coins.png", "Greek coins on a table (greyscale)"),
    "china": ("sklearn", "datasets/images/china.jpg", "Chinese temple roofs and trees"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "flower close-up"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "Grace Hopper, portrait"),
}


def photo_path(name: str) -> str:
    """Absolute path of the bundled photo ``name`` (a key of ``PHOTOS``).

    Raises KeyError for an unknown name and FileNotFoundError (saying which package to
    install) when the owning package is missing.
    """
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; available: {', '.join(PHOTOS)}")
    package, relpath, _ = PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"photo {name!r} ships with the {package!r} package, which is not installed (run `make install`)")
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"photo {name!r} not found at {path} (unexpected {package} version?)")
    return path


def load_photos(names=None) -> list:
    """Load bundled real photos as RGB images.

    Args:
        names: iterable of keys of ``PHOTOS`` (default: all of them, in ``PHOTOS`` order).
    Returns:
        list of ``(name, PIL.Image.Image)`` with mode "RGB" (greyscale photos are converted)
        at their original resolution (from 384x303 to 1411x1411 pixels).
    """
    from PIL import Image

    out = []
    for name in PHOTOS if names is None else names:
        with Image.open(photo_path(name)) as image:
            out.append((name, image.convert("RGB")))
    return out


def center_crop(image, size: int = 224):
    """Resize so the shorter side is ``size`` (bicubic), then crop the centre ``size x size``.

    Args:
        image: a PIL image (any mode; returned in the same mode).
        size: output side in pixels (> 0).
    Returns:
        a new ``size x size`` PIL image. This is the exact crop the DINOv2 preprocessing of
        ``dymu.assets`` feeds the encoder, so overlays drawn on it line up with the tokens.
    """
    from PIL import Image

    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def jpeg_size(image, size: int = 224, quality: int = 75) -> int:
    """Bytes of the JPEG encoding of ``center_crop(image, size)`` at ``quality``.

    A cheap, deterministic proxy for visual complexity: busy photos compress worse. Used to
    correlate DToMe's kept-token counts with image content.
    """
    buffer = io.BytesIO()
    center_crop(image.convert("RGB"), size).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_sizes(photos, size: int = 224, quality: int = 75) -> dict:
    """``{name: jpeg_size(image, size, quality)}`` for a list of ``(name, image)`` pairs."""
    return {name: jpeg_size(image, size, quality) for name, image in photos}
