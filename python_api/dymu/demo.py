"""``dymu demo``: DyMU on real weights and real photos.

1. DToMe in DINOv2 ViT-S/14 (224 px: 256 patches + CLS) at the three shipped threshold
   settings: a table of tokens kept per photo and setting, and its correlation with image
   complexity (JPEG size of the crop).
2. A PNG grid colouring each photo by its merged groups (the paper's qualitative figure).
3. A research VLM: DINOv2 patch features -> a fixed (untrained, seeded) linear projector ->
   SmolLM2-135M-Instruct. For each photo and setting it compares full tokens, merged + VTU, and
   merged without VTU (merged tokens at consecutive positions): next-token agreement with the
   full-token run, KL(full || variant) of the next-token distribution, and the cosine of the
   last hidden state. The projector is untrained, so this measures fidelity, not accuracy.
4. Wall-clock time of the encoder and of the LLM prefill, full against DyMU, per backend.

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
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
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


class ResearchVLM:
    """DINOv2 patch features -> fixed seeded linear projector -> SmolLM2 (fidelity studies only)."""

    def __init__(self, llm, tokenizer, vision_dim: int, seed: int = 0):
        self.llm, self.tokenizer = llm, tokenizer
        embed = llm.get_input_embeddings().weight.detach()
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(embed.shape[1], vision_dim, generator=g) / math.sqrt(vision_dim)
        self.weight = weight.to(embed.dtype)
        self.target_norm = float(embed.float().norm(dim=-1).mean())
        ids = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]  # noqa: E731
        with torch.no_grad():
            self.before = llm.get_input_embeddings()(ids(PROMPT_BEFORE))
            self.after = llm.get_input_embeddings()(ids(PROMPT_AFTER))
        self._hidden: List[torch.Tensor] = []
        llm.model.norm.register_forward_hook(lambda _m, _i, out: self._hidden.append(out))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[n, vision_dim] -> [n, H], rescaled so token norms match the text embeddings'."""
        x = features.to(self.weight.dtype) @ self.weight.T
        return x * (self.target_norm / x.norm(dim=-1, keepdim=True).mean().clamp_min(1e-6))

    def full(self, patches: torch.Tensor):
        """Stock LLM on [prompt ; all patch tokens ; prompt]: (next-token logits, last hidden)."""
        embeds = torch.cat([self.before, self.project(patches), self.after])[None]
        self._hidden.clear()
        with torch.no_grad():
            logits = self.llm(inputs_embeds=embeds).logits[0, -1]
        return logits.float(), self._hidden[-1][0, -1].float()

    def merged_without_vtu(self, tokens: torch.Tensor):
        """Stock LLM on the merged tokens at consecutive positions."""
        return self.full(tokens)

    def merged_vtu(self, tokens: torch.Tensor, pos_map: torch.Tensor, backend: Optional[str] = None):
        """VTU prefill on the merged tokens with their patch map."""
        from .vtu_inputs import VTUImage, build_vtu_inputs
        from .vtu_llm import vtu_forward

        batch = build_vtu_inputs([[self.before, VTUImage(self.project(tokens), pos_map), self.after]])
        self._hidden.clear()
        out = vtu_forward(self.llm, batch.inputs_embeds, batch.pos_map, full_lengths=batch.full_lengths, backend=backend)
        last = int(batch.merged_lengths[0]) - 1  # the last text token is its own merged row
        return out.logits[0, last].float(), self._hidden[-1][0, last].float()


def _decode_rates(vlm: "ResearchVLM", image, tokens: int = 16) -> Dict[str, float]:
    """Decode tokens/s of ``dymu.generate`` after the VTU prefill: merged cache vs full cache,
    plus both caches' bytes (prefill included in neither rate: it is timed separately)."""
    from .merged_cache import full_cache_nbytes
    from .vtu_inputs import VTUImage, build_vtu_inputs
    from .vtu_llm import generate, vtu_forward

    batch = build_vtu_inputs([[vlm.before, VTUImage(vlm.project(image.tokens), image.pos_map), vlm.after]])
    args = (vlm.llm, batch.inputs_embeds, batch.pos_map)
    kw = dict(full_lengths=batch.full_lengths)
    rates = {"tokens": tokens}
    for kind in ("full", "merged"):
        prefill = _best_time(lambda: generate(*args, 1, cache=kind, **kw), repeats=1)
        total = _best_time(lambda: generate(*args, tokens + 1, cache=kind, **kw), repeats=1)
        rates[kind] = tokens / max(total - prefill, 1e-9)
    rates["merged_bytes"] = vtu_forward(*args, use_cache=True, **kw).past_key_values.nbytes()
    rates["full_bytes"] = full_cache_nbytes(vtu_forward(*args, use_cache=True, cache="full", **kw).past_key_values)
    return rates


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
    from dymu_kernels._backends import implements

    from .assets import load_dinov2, load_smollm2
    from .calibration import load_thresholds
    from .encoders import DToMeEncoder
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

    # 3. fidelity of the research VLM
    print("loading SmolLM2-135M-Instruct (first run converts it into the cache) ...", flush=True)
    llm, tokenizer = load_smollm2()
    vlm = ResearchVLM(llm, tokenizer, vit.config.hidden_size)
    full_out = DToMeEncoder(vit, float("inf"))(pixels)
    reference = [vlm.full(full_out.last_hidden_state[i, 1:]) for i in _progress(range(len(names)), "LLM, full tokens")]
    fidelity: Dict[str, Fidelity] = {}
    for s in settings:
        from .vtu_inputs import images_from_encoder

        images = images_from_encoder(outputs[s].last_hidden_state, outputs[s].pos_map, outputs[s].lengths, drop_cls=True)
        stats = []
        for i in _progress(range(len(names)), f"LLM, {s}"):
            ref_logits, ref_hidden = reference[i]
            vtu_logits, vtu_hidden = vlm.merged_vtu(images[i].tokens, images[i].pos_map)
            nov_logits, nov_hidden = vlm.merged_without_vtu(images[i].tokens)
            stats.append((
                float(vtu_logits.argmax() == ref_logits.argmax()), float(nov_logits.argmax() == ref_logits.argmax()),
                _kl(ref_logits, vtu_logits), _kl(ref_logits, nov_logits),
                _cos(ref_hidden, vtu_hidden), _cos(ref_hidden, nov_hidden),
            ))
        fidelity[s] = Fidelity(*np.mean(np.array(stats), axis=0).tolist())
    say()
    say(f"## Fidelity of the research VLM (DINOv2-S/14 -> fixed projector -> SmolLM2-135M), mean over {len(names)} photos")
    say()
    say("| setting | tokens kept | next-token agreement (VTU / no VTU) | KL full→variant (VTU / no VTU) | last-hidden cosine (VTU / no VTU) |")
    say("| --- | ---: | ---: | ---: | ---: |")
    for s in settings:
        f = fidelity[s]
        say(f"| {s} | {np.mean(kept[s]):.1f} | {f.agree_vtu:.2f} / {f.agree_novtu:.2f} | {f.kl_vtu:.4f} / {f.kl_novtu:.4f} "
            f"| {f.cos_vtu:.4f} / {f.cos_novtu:.4f} |")

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
        from .vtu_inputs import images_from_encoder

        image = images_from_encoder(outputs[s].last_hidden_state[:1], outputs[s].pos_map[:1], outputs[s].lengths[:1], drop_cls=True)[0]
        llm_full = _best_time(lambda: vlm.full(full_out.last_hidden_state[0, 1:]))
        llm = {b: _best_time(lambda: vlm.merged_vtu(image.tokens, image.pos_map, backend=b))
               for b in _progress([b for b in backends if implements(b, "vtu_attention")], "timing LLM prefill")}
        say(f"| LLM prefill, 1 photo ({num_patches} vs {image.tokens.shape[0]} image tokens) | {llm_full * 1e3:.0f} ms | "
            + " | ".join(f"{llm[b] * 1e3:.0f} ms" if b in llm else "n/a" for b in backends) + " |")
        decode = _decode_rates(vlm, image)
        say(f"| decode, 1 photo, {decode['tokens']} greedy tokens (merged cache {decode['merged_bytes'] / 2**20:.2f} MiB vs "
            f"full {decode['full_bytes'] / 2**20:.2f} MiB) | {decode['full']:.1f} tok/s (full cache) | "
            + " | ".join(f"{decode['merged']:.1f} tok/s (merged cache)" if i == 0 else "" for i, _ in enumerate(backends)) + " |")
        timings = {"encoder_full": enc_full, "encoder": enc, "llm_full": llm_full, "llm": llm, "decode": decode}

    report = os.path.join(out_dir, "demo_report.md")
    with open(report, "w") as f:
        f.write("# dymu demo\n\n" + "\n".join(lines) + f"\n\n![groups]({os.path.basename(grid_path)})\n")
    print()
    print(f"picture: {os.path.abspath(grid_path)}")
    print(f"report:  {os.path.abspath(report)}")
    return {"kept": kept, "correlation": corr, "fidelity": fidelity, "timings": timings,
            "grid": grid_path, "report": report, "backends_info": dk.backend_info()}
