"""dymu: the model layer of dymu-kernels.

DToMe inside HuggingFace vision encoders, VTU attention inside HF RoPE LLMs, threshold
calibration and the ``dymu`` command line. The op layer it calls is ``dymu_kernels``.
"""

__version__ = "0.1.0"
