"""``dymu demo``: DyMU on real weights and real photos.

1. DToMe in DINOv2 ViT-S/14 (224 px: 256 patches + CLS) at the three shipped threshold
   settings: a table of tokens kept per photo and setting, and its correlation with image
   complexity (JPEG size of the crop).
2. A PNG grid colouring each photo by its merged groups (the paper's qualitative figure).
3. A research VLM built as a genuine ``LlavaForConditionalGeneration``: DINOv2-S/14 tower -> a
   fixed (untrained, seeded) projector -> SmolLM2-135M-Instruct. DyMU is switched on with
   ``dymu.patch_vlm(vlm, setting)`` and reached through the model's own forward and generate.
   For each photo and setting it compares full tokens (the stock model), merged + VTU, and
   merged without VTU (the same merged tokens at consecutive positions): next-token agreement
   with the full-token run, KL(full || variant) of the next-token distribution, and the cosine
   of the last hidden state; and prints the greedy answer of ``vlm.generate`` per setting. The
   projector is untrained, so this measures fidelity, not accuracy.
4. Wall-clock time of the encoder and of the VLM forward (tower + prefill), full against DyMU,
   per backend.

Outputs (markdown report, PNG grid) go to ``--out`` (default ./out/demo), printed at the end.
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

SETTINGS = ("low", "mid", "high")
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")  # the library's shipped thresholds
PROMPT_BEFORE = "<|im_start|>user\n"
PROMPT_AFTER = "\nWhat is in this picture? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"


def thresholds_path(setting: str) -> str:
    """The shipped threshold file of a setting (DINOv2-S/14 at 224 px)."""
    return os.path.join(DATA_DIR, f"dinov2_s14_224_{setting}.json")


def _progress(iterable, desc: str, total: Optional[int] = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _best_time(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Fidelity:
    agree_vtu: float
    agree_novtu: float
    kl_vtu: float
    kl_novtu: float
    cos_vtu: float
    cos_novtu: float


IMAGE_TOKEN = "<empty_output>"  # a special token of SmolLM2's vocabulary no prompt uses: the image placeholder


def build_research_vlm(vit, llm, tokenizer, pixels: torch.Tensor, seed: int = 0):
    """The research VLM as a genuine ``LlavaForConditionalGeneration``: DINOv2-S/14 tower
    (``vision_feature_layer=-1``, CLS dropped), a fixed projector, SmolLM2-135M.

    The projector is LLaVA's linear -> activation -> linear with a seeded random first matrix
    (384 -> 576), the identity activation and a scalar second matrix chosen once so that the
    projected patch tokens of ``pixels`` have, on average, the norm of SmolLM2's token
    embeddings. It is untrained: the VLM measures fidelity, not accuracy. The tower and the LLM
    are the given modules (shared, not copied).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=vit.config, text_config=llm.config, image_token_id=image_token_id, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="linear", multimodal_projector_bias=False,
    )  # fmt: skip
    with torch.device("meta"):
        vlm = LlavaForConditionalGeneration(config)
    vlm.model.vision_tower = vit
    vlm.model.language_model = llm.model
    vlm.lm_head = llm.lm_head
    embed = llm.get_input_embeddings().weight.detach()
    vision_dim = vit.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    first = (torch.randn(embed.shape[1], vision_dim, generator=g) / math.sqrt(vision_dim)).to(embed.dtype)
    with torch.no_grad():
        features = vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        scale = float(embed.float().norm(dim=-1).mean()) / float((features.to(embed.dtype) @ first.T).norm(dim=-1).mean())
    projector = type(vlm.model.multi_modal_projector)(config).to(embed.dtype)
    with torch.no_grad():
        projector.linear_1.weight.copy_(first)
        projector.linear_2.weight.copy_(torch.eye(embed.shape[1], dtype=embed.dtype) * scale)
    vlm.model.multi_modal_projector = projector
    vlm.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    return vlm.eval()


class VLMPrompts:
    """The demo's prompt around one photo, as a processor would give it to the VLM."""

    def __init__(self, vlm, tokenizer, num_patches: int):
        ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.vlm = vlm
        self.before, self.after = ids(PROMPT_BEFORE), ids(PROMPT_AFTER)
        self.input_ids = torch.tensor([self.before + [vlm.config.image_token_id] * num_patches + self.after])

    def vtu_batch(self, image):
        """``build_vtu_inputs`` of the prompt around one merged image (``images_from_encoder``'s
        tokens and map), projected by the VLM's projector: the manual path to ``dymu.generate``."""
        from ..vtu_inputs import VTUImage, build_vtu_inputs

        embed = self.vlm.get_input_embeddings()
        with torch.no_grad():
            tokens = self.vlm.model.multi_modal_projector(image.tokens[None].to(embed.weight.dtype))[0]
            before, after = embed(torch.tensor(self.before)), embed(torch.tensor(self.after))
        return build_vtu_inputs([[before, VTUImage(tokens, image.pos_map), after]])

    def inputs(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """input_ids [B, L], attention_mask, pixel_values [B, 3, H, W] (one photo per prompt)."""
        ids = self.input_ids.expand(pixels.shape[0], -1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def last(self, **inputs):
        """(next-token logits [B, V], last hidden state [B, H]) of the VLM's own forward."""
        with torch.no_grad():
            hidden = self.vlm.model(**inputs, use_cache=False).last_hidden_state[:, -1]
            return self.vlm.lm_head(hidden).float(), hidden.float()

    def merged_without_vtu(self, pixels: torch.Tensor):
        """Merged tokens (the patched tower + projector) fed at consecutive positions, stock LLM."""
        embed = self.vlm.get_input_embeddings()
        with torch.no_grad():
            tokens = self.vlm.model.get_image_features(pixel_values=pixels).pooler_output[0]
            embeds = torch.cat([embed(torch.tensor(self.before)), tokens, embed(torch.tensor(self.after))])[None]
        return self.last(inputs_embeds=embeds)

    def answer(self, tokenizer, pixels: torch.Tensor, max_new_tokens: int = 16) -> str:
        """The VLM's own greedy generate on one photo (DyMU when a patch is active)."""
        inputs = self.inputs(pixels)
        with torch.no_grad():
            out = self.vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _decode_rates(llm, prompts: "VLMPrompts", image, tokens: int = 16) -> Dict[str, float]:
    """Decode tokens/s of ``dymu.generate`` after the VTU prefill on the research VLM's LLM:
    merged cache vs full cache, plus both caches' bytes (the prefill, timed separately, is in
    neither rate). ``image`` is one ``VTUImage``-like (tokens, pos_map) from the encoder."""
    from ..merged_cache import full_cache_nbytes
    from ..vtu_llm import generate, vtu_forward

    batch = prompts.vtu_batch(image)
    args = (llm, batch.inputs_embeds, batch.pos_map)
    kw = dict(full_lengths=batch.full_lengths)
    rates = {"tokens": tokens}
    for kind in ("full", "merged"):
        prefill = _best_time(lambda: generate(*args, 1, cache=kind, **kw), repeats=1)
        total = _best_time(lambda: generate(*args, tokens + 1, cache=kind, **kw), repeats=1)
        rates[kind] = tokens / max(total - prefill, 1e-9)
    rates["merged_bytes"] = vtu_forward(*args, use_cache=True, **kw).past_key_values.nbytes()
    rates["full_bytes"] = full_cache_nbytes(vtu_forward(*args, use_cache=True, cache="full", **kw).past_key_values)
    return rates


def _encoder_cost_table(vit, pixels, encoders, settings, stock_seconds: float, say) -> Dict[str, Dict[str, float]]:
    """Encoder wall-clock per setting: packed (the default layout) vs padded vs the same loop
    unmerged, beside the FLOP-ideal speedup of the rows each block really processes."""
    from ..encoders import DToMeEncoder
    from .encoder_cost import flop_ideal_speedup

    cfg = vit.config
    mlp_dim = int(cfg.hidden_size * cfg.mlp_ratio)
    unmerged = _best_time(lambda: DToMeEncoder(vit, math.inf, layout="padded")(pixels))
    say()
    say(f"## Encoder cost per setting ({pixels.shape[0]} photos, default backend, best of 3)")
    say()
    say(f"Stock HF model {stock_seconds * 1e3:.0f} ms, the same block loop unmerged {unmerged * 1e3:.0f} ms.")
    say()
    say("| setting | packed | padded | packed vs padded | packed vs unmerged | FLOP-ideal | % of ideal |")
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    table = {}
    for s in settings:
        packed_encoder = encoders[s]
        padded_encoder = DToMeEncoder(vit, packed_encoder.thresholds, layout="padded")
        out = packed_encoder(pixels)
        packed = _best_time(lambda: packed_encoder(pixels))
        padded = _best_time(lambda: padded_encoder(pixels))
        ideal = flop_ideal_speedup(out.layer_lengths.cpu(), out.pos_map.shape[1], cfg.hidden_size, mlp_dim)
        speedup = unmerged / packed
        table[s] = {"packed": packed, "padded": padded, "unmerged": unmerged, "flop_ideal": ideal}
        say(f"| {s} | {packed * 1e3:.0f} ms | {padded * 1e3:.0f} ms | {padded / packed:.2f}x | {speedup:.2f}x | "
            f"{ideal:.2f}x | {100 * speedup / ideal:.0f}% |")
    return table


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def run(
    out_dir: str = os.path.join("out", "demo"),
    photo_names: Optional[Sequence[str]] = None,
    settings: Sequence[str] = SETTINGS,
    backends: Optional[Sequence[str]] = None,
    timing: bool = True,
) -> Dict[str, object]:
    """Run the demo; returns the numbers it printed (and writes the report and the grid)."""
    import dymu_kernels as dk
    from dymu_kernels._backends import implements, select as select_backend

    from .assets import load_dinov2, load_smollm2
    from ..calibration import load_thresholds
    from ..encoders import DToMeEncoder
    from .photos import jpeg_size, load_photos
    from .visualize import group_image, save_grid

    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    lines: List[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    print("loading DINOv2 ViT-S/14 (first run converts it into the cache) ...", flush=True)
    vit, preprocess = load_dinov2()
    photos = load_photos(photo_names)
    names = [name for name, _ in photos]
    crops = [np.asarray(preprocess.crop(img)) for _, img in photos]
    pixels = preprocess([img for _, img in photos])
    complexity = {name: jpeg_size(img) for name, img in photos}
    grid = pixels.shape[-1] // 14
    num_patches = grid * grid

    # 1. tokens kept per photo and setting
    encoders = {s: DToMeEncoder(vit, load_thresholds(thresholds_path(s), num_layers=vit.config.num_hidden_layers))
                for s in settings}
    outputs = {}
    for s in _progress(settings, "DToMe encoder"):
        outputs[s] = encoders[s](pixels)
    kept = {s: (outputs[s].lengths - 1).tolist() for s in settings}  # patch tokens kept (CLS excluded)
    say(f"## Tokens kept per photo (DINOv2 ViT-S/14 at {pixels.shape[-1]} px, {num_patches} patch tokens)")
    say()
    say("| photo | JPEG bytes | " + " | ".join(f"{s}" for s in settings) + " |")
    say("| --- | ---: | " + " | ".join("---:" for _ in settings) + " |")
    order = sorted(range(len(names)), key=lambda i: complexity[names[i]])
    for i in order:
        say(f"| {names[i]} | {complexity[names[i]]} | " + " | ".join(str(kept[s][i]) for s in settings) + " |")
    say("| **mean** | | " + " | ".join(f"**{np.mean(kept[s]):.1f} ({100 * np.mean(kept[s]) / num_patches:.0f}%)**" for s in settings) + " |")
    jpeg = [complexity[n] for n in names]
    corr = {s: _spearman(jpeg, kept[s]) for s in settings}
    say()
    say("Spearman correlation of tokens kept with JPEG size: " + ", ".join(f"{s} {corr[s]:+.2f}" for s in settings))

    # 2. the picture
    rows = []
    for i, name in enumerate(names):
        cols = [("photo", crops[i])]
        for s in settings:
            patch_rows = outputs[s].pos_map[i, 1:]  # drop CLS: raster-order patches
            cols.append((f"{s}: {kept[s][i]} tokens", group_image(crops[i], patch_rows, grid)))
        rows.append((name, cols))
    grid_path = save_grid(rows, os.path.join(out_dir, "dymu_groups.png"),
                          title="DToMe on DINOv2-S/14: each merged group painted with its mean colour")

    # 3. fidelity of the research VLM, a LlavaForConditionalGeneration reached through dymu.patch_vlm
    from ..vlm_patch import patch_vlm

    print("loading SmolLM2-135M-Instruct (first run converts it into the cache) ...", flush=True)
    llm, tokenizer = load_smollm2()
    vlm = build_research_vlm(vit, llm, tokenizer, pixels)
    prompts = VLMPrompts(vlm, tokenizer, num_patches)
    reference = [prompts.last(**prompts.inputs(pixels[i:i + 1])) for i in _progress(range(len(names)), "VLM, full tokens")]
    answer_photo = names.index("chelsea") if "chelsea" in names else 0
    answers = {"full": prompts.answer(tokenizer, pixels[answer_photo:answer_photo + 1])}
    fidelity: Dict[str, Fidelity] = {}
    for s in settings:
        stats = []
        with patch_vlm(vlm, s):
            for i in _progress(range(len(names)), f"VLM, {s}"):
                ref_logits, ref_hidden = reference[i]
                vtu_logits, vtu_hidden = prompts.last(**prompts.inputs(pixels[i:i + 1]))
                nov_logits, nov_hidden = prompts.merged_without_vtu(pixels[i:i + 1])
                stats.append((
                    float(vtu_logits[0].argmax() == ref_logits[0].argmax()), float(nov_logits[0].argmax() == ref_logits[0].argmax()),
                    _kl(ref_logits[0], vtu_logits[0]), _kl(ref_logits[0], nov_logits[0]),
                    _cos(ref_hidden[0], vtu_hidden[0]), _cos(ref_hidden[0], nov_hidden[0]),
                ))
            answers[s] = prompts.answer(tokenizer, pixels[answer_photo:answer_photo + 1])
        fidelity[s] = Fidelity(*np.mean(np.array(stats), axis=0).tolist())
    say()
    say(f"## Fidelity of the research VLM (LlavaForConditionalGeneration: DINOv2-S/14 -> fixed projector -> SmolLM2-135M), "
        f"mean over {len(names)} photos")
    say()
    say("DyMU through `dymu.patch_vlm(vlm, setting)` and the model's own forward; \"no VTU\" feeds the same merged "
        "tokens at consecutive positions.")
    say()
    say("| setting | tokens kept | next-token agreement (VTU / no VTU) | KL full→variant (VTU / no VTU) | last-hidden cosine (VTU / no VTU) |")
    say("| --- | ---: | ---: | ---: | ---: |")
    for s in settings:
        f = fidelity[s]
        say(f"| {s} | {np.mean(kept[s]):.1f} | {f.agree_vtu:.2f} / {f.agree_novtu:.2f} | {f.kl_vtu:.4f} / {f.kl_novtu:.4f} "
            f"| {f.cos_vtu:.4f} / {f.cos_novtu:.4f} |")
    say()
    say(f"Greedy answers of `vlm.generate` on {names[answer_photo]} (untrained projector: fidelity, not accuracy):")
    say()
    say("| setting | image tokens | answer |")
    say("| --- | ---: | --- |")
    say(f"| full | {num_patches} | {answers['full']!r} |")
    for s in settings:
        say(f"| {s} | {kept[s][answer_photo]} | {answers[s]!r} |")

    # 4. timings
    timings: Dict[str, Dict[str, float]] = {}
    if timing:
        backends = list(backends or [b for b in ("reference", "native") if implements(b, "dtome_merge")])
        s = "mid" if "mid" in settings else settings[0]
        say()
        say(f"## Wall-clock ({torch.get_num_threads()} threads, CPU, best of 3)")
        say()
        say("| stage | full | " + " | ".join(f"DyMU-{s} ({b})" for b in backends) + " |")
        say("| --- | ---: | " + " | ".join("---:" for _ in backends) + " |")
        enc_full = _best_time(lambda: vit(pixel_values=pixels))
        enc = {}
        for b in _progress(backends, "timing encoder"):
            os.environ["DYMU_BACKEND"] = b
            try:
                enc[b] = _best_time(lambda: encoders[s](pixels))
            finally:
                del os.environ["DYMU_BACKEND"]
        say(f"| encoder, {len(names)} photos | {enc_full * 1e3:.0f} ms | " + " | ".join(f"{enc[b] * 1e3:.0f} ms" for b in backends) + " |")
        one = prompts.inputs(pixels[:1])
        vlm_full = _best_time(lambda: prompts.last(**one))
        vlm_dymu = {}
        for b in _progress([b for b in backends if implements(b, "vtu_attention")], "timing VLM forward"):
            with patch_vlm(vlm, s, backend=b):
                vlm_dymu[b] = _best_time(lambda: prompts.last(**one))
        say(f"| VLM forward (tower + prefill), 1 photo ({num_patches} vs {kept[s][0]} image tokens) | {vlm_full * 1e3:.0f} ms | "
            + " | ".join(f"{vlm_dymu[b] * 1e3:.0f} ms" if b in vlm_dymu else "n/a" for b in backends) + " |")
        from ..vtu_inputs import images_from_encoder

        image = images_from_encoder(outputs[s].last_hidden_state[:1], outputs[s].pos_map[:1], outputs[s].lengths[:1], drop_cls=True)[0]
        decode = _decode_rates(llm, prompts, image)
        decode_backend = select_backend("vtu_decode_attention", torch.device("cpu"), None)  # what decoding ran on
        say(f"| decode, 1 photo, {decode['tokens']} greedy tokens of `dymu.generate` (merged cache {decode['merged_bytes'] / 2**20:.2f} MiB vs "
            f"full {decode['full_bytes'] / 2**20:.2f} MiB) | {decode['full']:.1f} tok/s (full cache) | "
            + " | ".join(f"{decode['merged']:.1f} tok/s (merged cache)" if b == decode_backend else "" for b in backends) + " |")
        timings = {"encoder_full": enc_full, "encoder": enc, "vlm_full": vlm_full, "vlm": vlm_dymu, "decode": decode}
        with torch.no_grad():
            timings["encoder_layouts"] = _encoder_cost_table(vit, pixels, encoders, settings, enc_full, say)

    report = os.path.join(out_dir, "demo_report.md")
    from .._atomic import write_text

    write_text(report, "# dymu demo\n\n" + "\n".join(lines) + f"\n\n![groups]({os.path.basename(grid_path)})\n")
    print()
    print(f"picture: {os.path.abspath(grid_path)}")
    print(f"report:  {os.path.abspath(report)}")
    return {"kept": kept, "correlation": corr, "fidelity": fidelity, "timings": timings, "answers": answers,
            "grid": grid_path, "report": report, "backends_info": dk.backend_info()}
