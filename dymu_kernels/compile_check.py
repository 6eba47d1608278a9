"""Compile every Triton kernel (and csrc .cu file) for real GPU targets, without a GPU.

    python -m dymu_kernels.compile_check            # cuda 90 and 80
    python -m dymu_kernels.compile_check --arch 90

Each Triton backend module lists its kernels in ``COMPILE_SPECS``: dicts with ``kernel`` (the
@triton.jit function), ``signature`` ({arg: "*fp32" | "i32" | "constexpr" ...}),
``constexprs`` ({name: value}, the block sizes it really launches with), optional
``num_warps`` / ``num_stages``, ``archs`` (the compute capabilities this configuration is
launched on, default all) and a ``name`` for the report. Compiling with the real compiler
catches what the interpreter lets through (tl.dot with K < 16, unsupported casts, shared
memory over the limit). For each kernel the report gives shared memory, registers and
spills (cuobjdump from the triton wheel reads the cubin; no driver needed).

With nvcc on PATH, every ``csrc/*.cu`` is also compiled with ``nvcc -c -arch=sm_90a`` against
the installed torch headers. Exits non-zero on any failure. Must run with TRITON_INTERPRET unset.
"""

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

MODULES = ("dymu_kernels.dtome.triton", "dymu_kernels.vtu.triton", "dymu_kernels.varlen.triton")
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in max)


def _resource_usage(cubin: bytes, workdir: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "registers: n/a (no cuobjdump in the triton wheel)"
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not match:
        return "registers: n/a"
    reg, stack, _, local = match.groups()
    spill = "no spills" if int(stack) == 0 and int(local) == 0 else f"SPILLS stack={stack} local={local}"
    return f"registers {reg}, {spill}"


def compile_triton(archs, workdir: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    total = 0
    for module_name in MODULES:
        specs = importlib.import_module(module_name).COMPILE_SPECS
        for spec in specs:
            for arch in [a for a in archs if a in spec.get("archs", archs)]:
                total += 1
                label = f"{spec.get('name', spec['kernel'].__name__)} [sm_{arch}]"
                start = time.perf_counter()
                try:
                    src = ASTSource(fn=spec["kernel"], signature=spec["signature"], constexprs=spec.get("constexprs", {}))
                    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
                    failures += 1
                    print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                shared = compiled.metadata.shared
                usage = _resource_usage(compiled.asm["cubin"], workdir)
                over = shared > SHARED_LIMIT[arch]
                failures += int(over)
                print(
                    f"{'FAIL' if over else 'ok  '} {label}: shared {shared} B{' (over the limit)' if over else ''}, "
                    f"{usage}, {time.perf_counter() - start:.1f} s"
                )
    print(f"triton: {total - failures}/{total} kernel compilations ok")
    return failures


def compile_cuda_sources(workdir: str) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(f for f in os.listdir(os.path.join(root, "csrc")) if f.endswith(".cu"))
    if not sources:
        print("nvcc: no csrc/*.cu files to compile")
        return 0
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc: not found, skipping csrc/*.cu")
        return 0
    from torch.utils.cpp_extension import include_paths

    # The CPU torch wheel lacks this generated header; a one-line stand-in is enough to compile.
    stub = os.path.join(workdir, "stub", "c10", "cuda", "impl")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(workdir, 'stub')}"]
    failures = 0
    for source in sources:
        cmd = [nvcc, "-c", "-arch=sm_90a", "-std=c++17", "-O3", "-DDYMU_WITH_CUDA=1", *includes,
               os.path.join(root, "csrc", source), "-o", os.path.join(workdir, source + ".o"), "-Xptxas", "-v"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        ok = result.returncode == 0
        failures += int(not ok)
        print(f"{'ok  ' if ok else 'FAIL'} nvcc {source} [sm_90a]")
        usage = [line for line in result.stderr.splitlines() if "registers" in line or "spill" in line]
        print("\n".join("     " + line.strip() for line in (usage if ok else result.stderr.splitlines()[-20:])))
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 90 and 80)")
    parser.add_argument("--no-nvcc", action="store_true", help="skip compiling csrc/*.cu")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, the compile check needs the real compiler")
        return 2
    archs = args.arch or [90, 80]
    with tempfile.TemporaryDirectory() as workdir:
        failures = compile_triton(archs, workdir)
        if not args.no_nvcc:
            failures += compile_cuda_sources(workdir)
    print("compile check:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
