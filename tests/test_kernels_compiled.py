"""The Triton kernels compile for an H100 (sm_90) on this CPU machine, at every ViT-L configuration their launchers
pick, without register spills in masking, unshuffle and the loss; the attention kernel's stack use in the training
precisions stays within its stated limit. (benchmarks/kernels_compiled.py; the full report for sm_80 / sm_90 / sm_100
and every shape is `mae bench kernels --compile-only`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernels_compiled import ATTENTION_STACK_LIMIT, occupancy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit_l_sm90(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.kernels_compiled", "--shapes", "vit-l", "--targets", "sm_90",
                        "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert out.is_file(), r.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_every_vit_l_configuration_compiles_for_sm90(vit_l_sm90):
    failed = [(r["kernel"], r["case"], r["error"]) for r in vit_l_sm90 if r["error"]]
    assert not failed, failed
    kernels = {r["kernel"] for r in vit_l_sm90}
    assert {"_masking_fwd_kernel", "_masking_bwd_kernel", "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel",
            "_norm_pix_mse_fwd_kernel", "_norm_pix_mse_finish_kernel", "_scale_grad_kernel", "_qkv_attn_fwd_kernel",
            "_qkv_attn_bwd_kernel"} <= kernels, kernels
    assert all(r["regs"] and r["regs"] <= 255 for r in vit_l_sm90)


def test_masking_unshuffle_and_the_loss_never_spill(vit_l_sm90):
    spills = [(r["kernel"], r["case"], r["regs"], r["stack"], r["local"]) for r in vit_l_sm90
              if r["family"] in ("masking", "unshuffle", "loss") and (r["stack"] or r["local"])]
    assert not spills, spills


def test_the_attention_kernel_stays_within_its_stated_stack_limit_in_bf16_and_fp16(vit_l_sm90):
    rows = [r for r in vit_l_sm90 if r["family"] == "attention" and not r["case"].startswith("float32")]
    assert rows
    over = [(r["kernel"], r["case"], r["stack"]) for r in rows if r["stack"] > ATTENTION_STACK_LIMIT]
    assert not over, over


def test_resources_and_occupancy_are_read_from_a_real_cubin(tmp_path):
    """The reading itself: a kernel compiled here for sm_90, and the occupancy arithmetic against hand counts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "k.py"  # Triton reads a kernel's source from its file
    script.write_text("import triton, triton.language as tl, json\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from benchmarks.kernels_compiled import resources\n"
            "@triton.jit\n"
            "def k(x, y, BLOCK: tl.constexpr):\n"
            "    i = tl.arange(0, BLOCK)\n"
            "    tl.store(y + i, tl.load(x + i) * 2)\n"
            "src = triton.compiler.ASTSource(k, {'x': '*fp32', 'y': '*fp32', 'BLOCK': 'constexpr'}, {(2,): 128})\n"
            "c = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': 4})\n"
            "print(json.dumps(resources(c.asm['cubin'])))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 8 <= res["reg"] <= 64 and res.get("stack", 0) == 0
    # 128 registers x 4 warps: 16 KB of registers per warp... 65536 / (128 * 32 * 4) = 4 blocks = 16 warps of 64
    assert occupancy(90, 128, 4, 0) == 16 / 64
    assert occupancy(90, 255, 8, 0) == 8 / 64  # 256 x 32 per warp: 65536 / (8192 x 8) = 1 block
    assert occupancy(90, 32, 4, 100 * 1024) == 8 / 64  # shared memory: 2 blocks of 100 KB in 228 KB
