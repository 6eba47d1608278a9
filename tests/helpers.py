"""Shared test helpers: the float64 oracle tolerance rule, padding poison and input makers."""

import torch


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest absolute error of x against the float64 oracle (NaN counts as infinite)."""
    diff = (x.double() - oracle.double()).abs()
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def assert_within_2x_torch(out: torch.Tensor, torch_same_dtype: torch.Tensor, oracle: torch.Tensor, floor: float = 1e-6):
    """flash-attention's rule: error vs float64 at most 2x plain PyTorch's in the same dtype + floor."""
    err, base = max_err(out, oracle), max_err(torch_same_dtype, oracle)
    assert err <= 2 * base + floor, f"error {err:.3e} exceeds 2 x PyTorch's {base:.3e} + {floor:.0e}"


def poison_padding(t: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A copy of t [B, N, ...] with rows >= lengths[b] filled with NaN (floats) or -7 (ints)."""
    out = t.clone()
    pad = torch.arange(t.shape[1], device=t.device)[None, :] >= lengths[:, None].to(t.device)
    out[pad] = float("nan") if t.is_floating_point() else -7
    return out


def clustered_metric(batch: int, n: int, c: int, centres: int, noise: float = 0.1, dtype=torch.float32, generator=None):
    """[batch, n, c] rows scattered around a few centres: plenty of high-similarity edges."""
    basis = torch.randn(batch, centres, c, generator=generator)
    assign = torch.randint(0, centres, (batch, n), generator=generator)
    rows = torch.gather(basis, 1, assign[..., None].expand(batch, n, c))
    return (rows + noise * torch.randn(batch, n, c, generator=generator)).to(dtype)


def rope_tables(num_positions: int, dim: int, base: float = 10000.0, dtype=torch.float32):
    """HF-layout cos/sin [num_positions, dim] (both halves equal)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def onto_map(batch: int, num_full: int, num_merged: int, generator=None) -> torch.Tensor:
    """[batch, num_full] int32 sorted maps that cover every merged row (an onto map)."""
    maps = []
    for _ in range(batch):
        extra = torch.randint(0, num_merged, (num_full - num_merged,), generator=generator)
        maps.append(torch.sort(torch.cat([torch.arange(num_merged), extra])).values)
    return torch.stack(maps).to(torch.int32)


TINY_LLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=256,
    attn_implementation="eager",
)


def tiny_causal_lm(cls_name: str, config_name: str, **extra):
    """A seeded random HF causal LM (e.g. "LlamaForCausalLM", "LlamaConfig") of TINY_LLM's size,
    eval mode, no EOS (so generate runs its full length); ``extra`` overrides config fields."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**TINY_LLM, **extra})
    model = getattr(transformers, cls_name)(config).eval()
    model.generation_config.eos_token_id = None
    return model
