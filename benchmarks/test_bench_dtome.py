"""DToMe merge step latency: fused op per backend vs the official-style eager merge.

Shapes: CLIP ViT-L/14-336 (N=577 with CLS, C=64 metric = keys averaged over heads' 64-d
head dim, D=1024) and SigLIP SO400M (N=729, no CLS, C=72, D=1152), B in {1, 8, 64}; the
threshold is calibrated on the batch so about 21 tokens merge per image.
"""

import pytest
import torch

import dymu_kernels as dk
from baselines import official_style_dtome_merge
from harness import DEVICE, kernel_backends, sync
from memory import peak_bytes
from roofline import dtome_merge_cost

SHAPES = {"CLIP-L/14-336": (577, 64, 1024, True), "SigLIP-SO400M": (729, 72, 1152, False)}
BATCHES = (1, 8, 64)
IMPLS = ["official-eager", *kernel_backends("dtome_merge")]


def make_step(name: str, batch: int, dtype=torch.float32):
    n, c, d, cls = SHAPES[name]
    g = torch.Generator().manual_seed(batch)
    centres = torch.randint(40, 200, (batch,), generator=g)
    metric = torch.stack([torch.randn(int(k), c, generator=g)[torch.randint(0, int(k), (n,), generator=g)] for k in centres])
    metric = metric + 0.35 * torch.randn(batch, n, c, generator=g)
    x = torch.randn(batch, n, d, generator=g)
    inputs = dict(
        x=x.to(DEVICE, dtype), metric=metric.to(DEVICE, dtype), size=torch.ones(batch, n, device=DEVICE),
        lengths=torch.full((batch,), n, dtype=torch.int32, device=DEVICE),
        pos_map=torch.arange(n, dtype=torch.int32, device=DEVICE).repeat(batch, 1),
    )
    node_max, _ = dk.bipartite_similarity(inputs["metric"], inputs["lengths"], protect_first=cls, backend="reference")
    tau = float(dk.batch_threshold(node_max, 21, backend="reference"))
    return inputs, tau, cls


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dtome_merge(benchmark, shape, batch, impl):
    inputs, tau, cls = make_step(shape, batch)
    if impl == "official-eager":
        def run():
            out = official_style_dtome_merge(inputs["x"], inputs["metric"], inputs["size"], tau, class_token=cls)
            sync()
            return out
    else:
        def run():
            out = dk.dtome_merge(inputs["x"], inputs["metric"], inputs["size"], inputs["lengths"], tau,
                                 pos_map=inputs["pos_map"], protect_first=cls, backend=impl)
            sync()
            return out
    benchmark.group = f"dtome_merge {shape} B={batch}"
    benchmark.extra_info.update(impl=impl, op="dtome_merge", shape=f"{shape} B={batch}", device=str(DEVICE),
                                peak_bytes=peak_bytes(run),
                                roofline=dtome_merge_cost(batch, *SHAPES[shape][:3], dtype="fp32").as_dict())
    result = benchmark(run)
    if impl != "official-eager":
        kept = result.lengths.float().mean().item()
        assert 0 < kept <= inputs["x"].shape[1]
        benchmark.extra_info["tokens_kept_mean"] = kept
