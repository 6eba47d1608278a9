"""dymu: the model layer of dymu-kernels.

DToMe inside HuggingFace vision encoders, VTU attention inside HF RoPE LLMs, threshold
calibration and the ``dymu`` command line. The op layer it calls is ``dymu_kernels``.
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
