"""Compile every Triton kernel (and csrc .cu file) for real GPU targets, without a GPU.

    python -m dymu_kernels.compile_check            # cuda 90 and 80
    python -m dymu_kernels.compile_check --arch 90

Each Triton backend module lists its kernels in ``COMPILE_SPECS``: dicts with ``kernel`` (the
@triton.jit function), ``signature`` ({arg: "*fp32" | "i32" | "constexpr" ...}),
``constexprs`` ({name: value}, the block sizes it really launches with), optional
``num_warps`` / ``num_stages``, ``archs`` (the compute capabilities this configuration is
launched on, default all) and a ``name`` for the report. Two optional keys make the compile
match what the runtime really builds:

- ``specialize``: ``{"divisible_by_16": [arg names], "equal_to_1": [arg names]}``. At launch
  Triton specialises every pointer and every integer argument not in ``do_not_specialize``:
  a pointer or integer divisible by 16 gets the ``tt.divisibility = 16`` attribute (what lets
  it emit 128-bit loads and ``cp.async``), and an integer equal to 1 becomes the constexpr 1.
  Here the first list becomes ASTSource ``attrs`` ``{(index,): [["tt.divisibility", 16]]}``
  and the second turns the argument into a constexpr of value 1 (as triton 3.6 / 3.7 do).
- ``vectorized_loads``: True asserts that the PTX holds vectorised global loads
  (``ld.global...v2`` / ``v4``) or ``cp.async``, i.e. the main gathers are not scalar.

Compiling with the real compiler catches what the interpreter lets through (tl.dot with
K < 16, unsupported casts, shared memory over the limit). For each kernel the report gives
shared memory, registers and spills (cuobjdump from the triton wheel reads the cubin; no
driver needed). A kernel FAILS on any spill (stack or local memory > 0), on shared memory over
the limit, and on scalar-only loads where ``vectorized_loads`` is set.

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

MODULES = (
    "dymu_kernels.dtome.triton",
    "dymu_kernels.vtu.triton",
    "dymu_kernels.vtu_decode.triton",
    "dymu_kernels.varlen.triton",
)
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in max)


def _resource_usage(cubin: bytes, workdir: str):
    """(text for the report, spilled?) from cuobjdump's resource usage of the cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "registers: n/a (no cuobjdump in the triton wheel)", False
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not match:
        return "registers: n/a", False
    reg, stack, _, local = match.groups()
    spilled = int(stack) > 0 or int(local) > 0
    spill = f"SPILLS stack={stack} local={local}" if spilled else "no spills"
    return f"registers {reg}, {spill}", spilled


def vectorized_loads(ptx: str) -> dict:
    """Counts of global loads in a PTX text: {"vector": ld.global...v2/v4, "scalar": the other
    ld.global, "cp_async": cp.async}."""
    vector = len(re.findall(r"\bld\.global[.\w:]*\.v[24]\.", ptx))
    scalar = len(re.findall(r"\bld\.global\b", ptx)) - vector
    return {"vector": vector, "scalar": scalar, "cp_async": len(re.findall(r"\bcp\.async\.(ca|cg)\b", ptx))}


def ast_source_args(spec: dict) -> dict:
    """signature, constexprs and attrs for ``ASTSource`` from a COMPILE_SPECS entry, with its
    ``specialize`` (runtime specialisation) applied; see the module docstring."""
    kernel = spec["kernel"]
    signature = dict(spec["signature"])
    constexprs = dict(spec.get("constexprs", {}))
    special = spec.get("specialize") or {}
    unknown = set(special) - {"divisible_by_16", "equal_to_1"}
    if unknown:
        raise ValueError(f"specialize: unknown keys {sorted(unknown)}")
    attrs = {}
    for name in special.get("divisible_by_16", ()):
        if signature.get(name, "constexpr") == "constexpr":
            raise ValueError(f"specialize: {name} is not a runtime argument of {kernel.__name__}")
        attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in special.get("equal_to_1", ()):
        if signature.get(name, "constexpr") == "constexpr" or signature[name].startswith("*"):
            raise ValueError(f"specialize: {name} is not an integer argument of {kernel.__name__}")
        signature[name] = "constexpr"
        constexprs[name] = 1
    return dict(signature=signature, constexprs=constexprs, attrs=attrs)


def compile_triton(archs, workdir: str, only: str = "") -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    total = 0
    for module_name in MODULES:
        specs = importlib.import_module(module_name).COMPILE_SPECS
        for spec in specs:
            if only and only not in spec.get("name", spec["kernel"].__name__):
                continue
            for arch in [a for a in archs if a in spec.get("archs", archs)]:
                total += 1
                label = f"{spec.get('name', spec['kernel'].__name__)} [sm_{arch}]"
                start = time.perf_counter()
                try:
                    src = ASTSource(fn=spec["kernel"], **ast_source_args(spec))
                    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
                    failures += 1
                    print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                shared = compiled.metadata.shared
                usage, spilled = _resource_usage(compiled.asm["cubin"], workdir)
                over = shared > SHARED_LIMIT[arch]
                loads = vectorized_loads(compiled.asm["ptx"])
                scalar_only = bool(spec.get("vectorized_loads")) and loads["vector"] + loads["cp_async"] == 0
                bad = over or spilled or scalar_only
                failures += int(bad)
                print(
                    f"{'FAIL' if bad else 'ok  '} {label}: shared {shared} B{' (over the limit)' if over else ''}, "
                    f"{usage}, loads v2/v4 {loads['vector']} scalar {loads['scalar']} cp.async {loads['cp_async']}"
                    f"{' (SCALAR ONLY)' if scalar_only else ''}, {time.perf_counter() - start:.1f} s"
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
    parser.add_argument("--only", default="", help="compile only the specs whose name contains this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, the compile check needs the real compiler")
        return 2
    archs = args.arch or [90, 80]
    with tempfile.TemporaryDirectory() as workdir:
        failures = compile_triton(archs, workdir, args.only)
        if not args.no_nvcc:
            failures += compile_cuda_sources(workdir)
    print("compile check:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
