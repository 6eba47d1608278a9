"""The compile check itself: the runtime specialisation it applies, the PTX load census, and
one real compile (in a subprocess with TRITON_INTERPRET unset) that must pass."""

import os
import subprocess
import sys

import pytest

from dymu_kernels import compile_check as cc


def _kernel():
    from dymu_kernels.dtome import triton_kernels as tk

    return tk.merge_kernel


def test_ast_source_args_translate_specialize():
    kernel = _kernel()
    names = list(kernel.arg_names)
    sig = {name: "i32" for name in names}
    sig.update(x_ptr="*fp16", x_out_ptr="*fp16")
    consts = {"HAS_POS_MAP": True}
    for name in consts:
        sig[name] = "constexpr"
    spec = dict(kernel=kernel, signature=sig, constexprs=consts,
                specialize={"divisible_by_16": ["x_ptr", "stride_xn"], "equal_to_1": ["stride_xd"]})
    args = cc.ast_source_args(spec)
    assert args["attrs"] == {(names.index("x_ptr"),): [["tt.divisibility", 16]],
                             (names.index("stride_xn"),): [["tt.divisibility", 16]]}
    assert args["signature"]["stride_xd"] == "constexpr" and args["constexprs"]["stride_xd"] == 1
    assert spec["signature"]["stride_xd"] == "i32"  # the spec itself is not modified
    # a spec without the new keys is compiled as before
    plain = cc.ast_source_args(dict(kernel=kernel, signature=sig, constexprs=consts))
    assert plain == dict(signature=sig, constexprs=consts, attrs={})


@pytest.mark.parametrize("bad", [{"divisible_by_16": ["HAS_POS_MAP"]}, {"equal_to_1": ["x_ptr"]}, {"aligned": []}])
def test_ast_source_args_reject_bad_specialize(bad):
    kernel = _kernel()
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(x_ptr="*fp16", HAS_POS_MAP="constexpr")
    with pytest.raises(ValueError):
        cc.ast_source_args(dict(kernel=kernel, signature=sig, constexprs={"HAS_POS_MAP": True}, specialize=bad))


def test_vectorized_load_census():
    ptx = "\n".join([
        "ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "@%p1 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];",
        "ld.global.b16 %rs1, [ %rd3 + 0 ];",
        "ld.global.nc.b32 %r7, [ %rd4 ];",
        "cp.async.cg.shared.global [ %r8 + 0 ], [ %rd5 + 0 ], 0x10, %r9;",
        "ld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r10 ];",
    ])
    assert cc.vectorized_loads(ptx) == {"vector": 2, "scalar": 2, "cp_async": 1}


def test_every_spec_key_is_known():
    import importlib

    known = {"name", "kernel", "signature", "constexprs", "num_warps", "num_stages", "archs", "specialize",
             "vectorized_loads"}
    for module in cc.MODULES:
        for spec in importlib.import_module(module).COMPILE_SPECS:
            assert set(spec) <= known, (spec.get("name"), set(spec) - known)
            if "specialize" in spec:
                cc.ast_source_args(spec)  # raises on names that are not runtime arguments


def test_real_compile_of_a_runtime_variant():
    # The real compiler in a clean process (the interpreter must be off there): the fp32 merge
    # with the runtime specialisation compiles for sm_90 with vectorised gathers and no spill.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "dymu_kernels.compile_check", "--no-nvcc", "--arch", "90",
         "--only", "dtome.merge[CLIP fp32, pos_map=True, runtime]"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1/1 kernel compilations ok" in out.stdout and "no spills" in out.stdout, out.stdout
