"""Compile every kernel for a GPU architecture without a GPU: `python -m moeserve.kernels.compile_check`.

The interpreter checks what a kernel computes but is lenient about types and layouts; this runs
Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas Triton ships) for
sm_90 (Hopper) by default, at the constexpr combinations the launchers use, and reports each
kernel's shared memory and the matrix instructions in its PTX (wgmma on Hopper, mma before).
Arguments are specialised as Triton's JIT does at a typical launch: unit strides become the
constant 1 and pointers and the listed strides and sizes are known multiples of 16 (without
that the loads cannot be vectorised or pipelined, and the report would describe a kernel that
never runs). Must run with TRITON_INTERPRET unset: the kernels are decorated at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: str  # module:function
    pointers: dict[str, str]  # argument -> Triton pointer type, e.g. "*bf16"
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()  # integer arguments that are multiples of 16 at a typical launch


def _moe(act: bool, dtype: str, ieee: bool, bm: int, bn: int, bk: int, warps: int, stages: int) -> Variant:
    return Variant(
        f"fused_moe[{'gate_up' if act else 'down'},{dtype},{bm}x{bn}x{bk}]",
        "moeserve.kernels.fused_moe:fused_moe_kernel",
        {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "weights_ptr": "*fp32",
         "sorted_ids_ptr": "*i32", "block_slot_ptr": "*i32", "num_padded_ptr": "*i32"},
        dict(A_ROW_DIV=2 if act else 1, ACT=act, MUL_WEIGHT=not act, DOT_FP32=False, FP32_IEEE=ieee,
             EMULATE_BF16=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
             stride_ak=1, stride_bk=1, stride_cn=1),
        warps, stages,
        ("stride_am", "stride_be", "stride_bn", "stride_cm", "Ncols", "Kdim", "up_offset"),
    )


def _attention(kind: str, dtype: str, label: str = "", **extra) -> Variant:
    cache = {"k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}", "block_tables_ptr": "*i64",
             "seq_lens_ptr": "*i64", "sinks_ptr": f"*{dtype}"}
    common = dict(DOT_FP32=False, FP32_IEEE=dtype == "fp32", EMULATE_BF16=False, B=16, BLOCK_D=128, BLOCK_DV=128,
                  HAS_SINKS=False)
    aligned = ("Dh", "Dv", "stride_qh", "stride_oh", "stride_kb", "stride_kt", "stride_kh")
    if kind == "decode":
        extra = {"BLOCK_G": 16, **extra}
        return Variant(f"decode[{dtype},splits={extra['SPLITS']}{label}]",
                       "moeserve.kernels.paged_attention:decode_kernel",
                       {"q_ptr": f"*{dtype}", **cache, "out_ptr": f"*{dtype}", "part_m_ptr": "*fp32",
                        "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"},
                       dict(common, **{"BLOCK_N": 64, **extra}), aligned=aligned + ("stride_qs", "stride_os"))
    return Variant(f"prefill[{dtype}{label}]", "moeserve.kernels.paged_attention:prefill_kernel",
                   {"q_ptr": f"*{dtype}", **cache, "query_start_ptr": "*i64", "block_seq_ptr": "*i64",
                    "block_q_ptr": "*i64", "out_ptr": f"*{dtype}"},
                   dict(common, **{"BLOCK_M": 64, "BLOCK_N": 64, "G_PAD": 4, **extra}), 4, 3,
                   aligned=aligned + ("stride_qt", "stride_ot"))


def _router(label: str, E: int, K: int, scoring: int, group_select: int = 0, n_group: int = 1,
            topk_group: int = 1) -> Variant:
    return Variant(f"router[{label},K={K},E={E}]", "moeserve.kernels.router:topk_router_kernel",
                   {"logits_ptr": "*fp32" if group_select else "*bf16", "k_ptr": "*i64", "correction_ptr": "*fp32",
                    "weights_ptr": "*fp32", "ids_ptr": "*i64"},
                   dict(TOP_K=K, SCORING=scoring, RENORMALIZE=True, CORRECTION=group_select == 2,
                        GROUP_SELECT=group_select, N_GROUP=n_group, TOPK_GROUP=topk_group, BLOCK_T=32 if E <= 128 else 8,
                        BLOCK_E=1 << (E - 1).bit_length(), BLOCK_K=1 << (K - 1).bit_length(), BLOCK_GR=n_group))


VARIANTS = (
    _moe(True, "bf16", False, 16, 64, 128, 4, 4),  # decode-sized blocks
    _moe(False, "bf16", False, 16, 64, 128, 4, 4),
    _moe(True, "bf16", False, 128, 128, 64, 8, 3),  # prefill-sized blocks
    _moe(False, "bf16", False, 128, 128, 64, 8, 3),
    _moe(True, "fp16", False, 64, 64, 64, 4, 4),
    _moe(True, "fp32", True, 64, 64, 32, 4, 3),
    Variant("moe_align", "moeserve.kernels.moe_align:moe_align_kernel",
            {"slots_ptr": "*i64", "sorted_ids_ptr": "*i32", "block_slot_ptr": "*i32", "num_padded_ptr": "*i32",
             "local_slot_ptr": "*i64", "shift_ptr": "*i32"},
            dict(HAS_LOCAL=True, BM=16, BLOCK_N=512, BLOCK_P=256, BLOCK_B=256, FILL=1024)),
    _router("softmax", 128, 8, 0),
    _router("deepseek-v3 groups", 256, 8, 1, group_select=2, n_group=8, topk_group=4),  # fp32 logits
    _router("deepseek-v2 groups", 160, 6, 0, group_select=1, n_group=8, topk_group=3),
    _router("gpt-oss topk_softmax", 32, 4, 2),
    _attention("decode", "bf16", SPLITS=1),
    _attention("decode", "bf16", SPLITS=8),
    _attention("decode", "fp32", SPLITS=1),
    # GPT-OSS: sinks, head dim 64, 8 query heads per KV head.
    _attention("decode", "bf16", ",sinks", SPLITS=8, HAS_SINKS=True, BLOCK_D=64, BLOCK_DV=64),
    # DeepSeek-V3 absorbed MLA decode: 128 heads on one latent KV head, 16 per program, key
    # 512 + 64 (padded to 1024), value 512, KV tiles of 16: the launcher's choice. Not tuned.
    _attention("decode", "bf16", ",mla", SPLITS=1, BLOCK_G=16, BLOCK_D=1024, BLOCK_DV=512, BLOCK_N=16),
    Variant("decode_reduce", "moeserve.kernels.paged_attention:decode_reduce_kernel",
            {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "sinks_ptr": "*bf16",
             "out_ptr": "*bf16"},
            dict(SPLITS=8, BLOCK_D=128, HAS_SINKS=True, EMULATE_BF16=False), aligned=("Dh", "stride_os", "stride_oh")),
    _attention("prefill", "bf16"),
    _attention("prefill", "fp16"),
    _attention("prefill", "bf16", ",sinks", HAS_SINKS=True, BLOCK_D=64, BLOCK_DV=64, G_PAD=8),
)


def compile_variant(v: Variant, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = v.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    names = fn.arg_names
    scalars = {"scale": "fp32", "scaling": "fp32"}
    signature = {n: v.pointers.get(n) or ("constexpr" if n in v.constexprs else scalars.get(n, "i32"))
                 for n in names}
    constexprs = {(names.index(k),): value for k, value in v.constexprs.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*v.pointers, *v.aligned)}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    ptx = compiled.asm["ptx"]
    return {"shared_bytes": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
            "mma": "mma.sync" in ptx, "cp_async": "cp.async" in ptx, "cubin_bytes": len(compiled.asm["cubin"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter replaces the kernels at import time")
    report = {v.name: compile_variant(v, args.arch) for v in VARIANTS}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, info in report.items():
            print(f"{name:40s} shared {info['shared_bytes']:6d} B  wgmma {info['wgmma']!s:5s}  "
                  f"mma {info['mma']!s:5s}  cp.async {info['cp_async']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
