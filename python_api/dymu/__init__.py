"""dymu: the model layer of dymu-kernels.

The library: DToMe inside HuggingFace vision encoders (``encoders``), VTU attention inside HF
RoPE LLMs (``vtu_llm``, ``vtu_inputs``) with a compact merged KV cache (``merged_cache``), DyMU in
an HF LLaVA model with one call (``vlm_patch``) and threshold calibration (``calibration``). The
op layer it calls is ``dymu_kernels``. The application (the ``dymu`` command, the demo, assets,
photos, the benchmark report) is the subpackage ``dymu.app``, which the library never imports.
"""

__version__ = "0.1.0"

# DToMe in HF vision encoders and threshold calibration (these import torch, not transformers).
from .calibration import CalibratedThresholds, calibrate_thresholds, load_thresholds, save_thresholds  # noqa: E402
from .encoders import DToMeEncoder, DToMeEncoderOutput  # noqa: E402

# VTU in HF Llama-family causal LMs (transformers is imported only when a model is used).
from .vtu_inputs import VTUImage, VTUInputs, build_vtu_inputs, images_from_encoder  # noqa: E402
from .vtu_llm import VTUCausalLMOutput, decode_step, generate, vtu_forward  # noqa: E402

# DyMU in an HF LLaVA / LLaVA-OneVision model with one call (composes the two above).
from .vlm_patch import VLMPatch, patch_vlm, shipped_settings  # noqa: E402


def __getattr__(name):
    # MergedCache subclasses transformers' Cache: imported on first use, so `import dymu` stays
    # free of transformers.
    if name == "MergedCache":
        from .merged_cache import MergedCache

        return MergedCache
    raise AttributeError(f"module 'dymu' has no attribute {name!r}")
