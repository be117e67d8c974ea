"""Compile every DAR kernel for an NVIDIA GPU (sm_80, through PTX to a cubin with Triton's bundled ptxas) without
a GPU. The interpreter accepts code the GPU compiler rejects (tl.dot shapes, loop-carried types, int widths), so
this is the check that the kernels the tests verify are also kernels a GPU can run. Runs as a script: the kernels
must be imported with TRITON_INTERPRET unset. Prints one line per kernel variant."""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_dar.kernels import dar_attention, dar_cache

CACHE = "*bf16"  # caches, activations; tables and offsets int32 (the slot mappings int64)
POINTERS = {"far_table_ptr": "*i32", "window_table_ptr": "*i32", "query_start_loc_ptr": "*i32",
            "seq_lens_ptr": "*i32", "window_slots_ptr": "*i64", "far_slots_ptr": "*i64",
            "q_proj_ptr": "*fp32", "k_down_ptr": "*fp32", "v_down_ptr": "*fp32", "v_up_ptr": "*fp32",
            "q_red_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_acc_ptr": "*fp32"}


def compile_kernel(fn, constexprs: dict, arch: int = 80) -> None:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, CACHE)
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
    print(f"{fn.__name__} {constexprs}: compiled for sm_{arch}")


def main() -> int:
    rank = {"KEY_RANK": 16, "RK_PAD": 16}
    compile_kernel(dar_cache.dar_write_kv_kernel, dict(HEAD_DIM=64, HEADS=1, DG_PAD=64, VALUE_RANK=16, RV_PAD=16,
                                                       WINDOW_BLOCK=16, FAR_BLOCK=16, **rank))
    compile_kernel(dar_attention.dar_query_project_kernel, dict(HEAD_DIM=64, D_PAD=64, BLOCK_T=16, **rank))
    rows = {"HEADS": 3, "HEADS_PAD": 4, "BLOCK_M": 4, "VALUE_RANK": 16, "RV_PAD": 16, "DOT_UPCAST": False}  # decode
    compile_kernel(dar_attention.dar_far_kernel, dict(FAR_BLOCK=16, BLOCK_N=64, **rank, **rows))
    compile_kernel(dar_attention.dar_full_kernel, dict(HEAD_DIM=64, D_PAD=64, WINDOW_BLOCK=16, BLOCK_N=32,
                                                       UP_PRECISION="tf32", **rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
