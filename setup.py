"""Build and install dymu-kernels.

Two packages are installed: ``dymu_kernels`` (the op layer, with the compiled ``dymu_kernels._C``
built from ``csrc/``) and ``dymu`` (the model layer, from ``python_api/``), plus the ``dymu``
command.

The extension always builds the C++ CPU sources (OpenMP). CUDA sources (``csrc/*.cu``) are
added only when torch was built with CUDA and a toolkit is found (``CUDA_HOME``); set
``DYMU_NO_CUDA=1`` to skip them. Install with ``pip install --no-build-isolation -e .``.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("DYMU_NO_CUDA", "0") != "1"
    )
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
    # -ffast-math lets gcc vectorise fp32 reductions; -fno-finite-math-only keeps -inf/NaN
    # semantics, which the masking rules rely on.
    define_macros = [("DYMU_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        return [
            cpp_extension.CUDAExtension(
                "dymu_kernels._C",
                cpp_sources + cuda_sources,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "dymu_kernels._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="dymu-kernels",
    version="0.1.0",
    description="Fused kernels for DyMU: dynamic token merging (DToMe) and virtual token unmerging (VTU)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "dymu_kernels", "dymu_kernels.dtome", "dymu_kernels.vtu", "dymu_kernels.vtu_decode", "dymu_kernels.varlen",
        "dymu", "dymu.app",
    ],
    package_dir={"dymu_kernels": "dymu_kernels", "dymu": "python_api/dymu"},
    package_data={"dymu": ["data/*.json", "data/*.md"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    install_requires=[
        "torch>=2.5",
        "numpy>=1.24",
        "tqdm>=4.60",
        "safetensors>=0.4",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=5.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["dymu = dymu.app.cli:main"]},
)
