"""Every Triton kernel of `kernels/` compiled ahead of time for named GPU targets, on a machine without a GPU.

The kernels' own launchers run, unchanged, on meta tensors (the attention kernel, a torch custom op, on one small CPU
batch: its integer arguments do not depend on the batch) with Triton's active driver replaced by a stand-in for the
target: each launch reaches Triton's compile hook with exactly the signature, specialisation (integer divisibility
included), constexprs and warps the launcher chose, and stops there (nothing runs). Each distinct launch is then
compiled for sm_80 (A100), sm_90 (H100 / H200) and sm_100 (B200) with the ptxas Triton ships, and the cubin's
resources are read with the cuobjdump it ships: registers, stack (register spills and local arrays), shared memory.
Occupancy follows from those and the target's per-SM limits.

    python -m benchmarks.kernels_compiled                         # every shape and target; report in bench-results/
    mae bench kernels --compile-only --out benchmarks/results     # the same, through the command line
    python -m benchmarks.kernels_compiled --shapes vit-l --targets sm_90 --json out.json   # what the test runs

What this proves: the kernels compile for each target at every configuration the launchers pick, and how many
registers, how much stack and shared memory they take. What it cannot: speed, and numerics (the interpreter tests
hold those on the CPU; the CUDA checks in PENDING.md on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
# per-SM limits (CUDA programming guide, compute capabilities 8.0 / 9.0 / 10.0)
SM_LIMITS = {80: dict(regs=65536, warps=64, blocks=32, smem=164 * 1024),
             90: dict(regs=65536, warps=64, blocks=32, smem=228 * 1024),
             100: dict(regs=65536, warps=64, blocks=32, smem=228 * 1024)}
SHAPES = {"debug": ("debug", 32), "vit-b": ("mae_vit_base_patch16", 1024), "vit-l": ("mae_vit_large_patch16", 1024),
          "vit-h": ("mae_vit_huge_patch14", 1024)}
"""name -> (preset, batch): the architecture comes from the preset itself; batch 1024 per device is the largest the
integer offsets must hold (and sets the divisibility Triton specialises on)."""
MASK_RATIOS = (0.5, 0.75, 0.9)
DTYPES = ("float32", "bfloat16", "float16")
FAMILY = {"_masking_fwd_kernel": "masking", "_masking_bwd_kernel": "masking", "_unshuffle_fwd_kernel": "unshuffle",
          "_unshuffle_bwd_kernel": "unshuffle", "_norm_pix_mse_fwd_kernel": "loss",
          "_norm_pix_mse_finish_kernel": "loss", "_scale_grad_kernel": "loss", "_qkv_attn_fwd_kernel": "attention",
          "_qkv_attn_bwd_kernel": "attention"}
ATTENTION_STACK_LIMIT = 256
"""The attention kernel's stated limit on stack (spill) bytes in bf16 / fp16 at the ViT-L shapes on sm_90, held by the
test as the other kernels' zero is: its backward at 99 visible tokens (a 64 + 64 row tile pair, 255 registers) spills
160-168 B there. In fp32 (IEEE dot products, the precision of the parity checks, not of training with the kernel) it
compiles to about 1 MB of PTX and spills kilobytes (ViT-L on sm_90, 2026-12-02: 18.8 KB forward and 24.9 KB
backward at 99 tokens); it is compiled only with --attention-fp32."""


@dataclass
class Launch:
    kernel: str
    family: str
    shapes: list[str]
    case: str
    signature: dict
    constants: dict
    num_warps: int
    num_stages: int
    key: str


@dataclass
class Compiled:
    kernel: str
    family: str
    target: str
    case: str
    shapes: list[str]
    num_warps: int
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    shared: int | None = None
    occupancy: float | None = None
    error: str | None = None


# --- capture: the launchers' own choices ---------------------------------------------------------------------


class _StandInDriver:
    """Triton's active driver for a target with no GPU present: enough for its launch path to reach compilation."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"the stand-in driver has no {name}: this path needs a GPU")


def capture(shape_names, attention_fp32: bool = False) -> list[tuple[Launch, object, dict]]:
    """Run every launcher at every configuration for the named shapes; returns (launch, jit function, compile
    arguments) per distinct launch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter never compiles")
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from engine.config import get_preset
    from kernels.attention import qkv_attention_triton, supported
    from kernels.loss import norm_pix_mse_triton
    from kernels.masking import len_keep_for, random_masking_triton, unshuffle_triton

    saved_driver = driver._active
    driver.set_active(_StandInDriver(GPUTarget("cuda", 90, 32)))
    found: dict[str, tuple[Launch, object, dict]] = {}
    where = {"shape": "", "case": ""}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        name = jit.fn.__name__
        ident = json.dumps([name, compile["signature"], sorted((str(k), str(v)) for k, v in compile["constants"].items()),
                            compile["num_warps"], compile["num_stages"], str(compile["configs"])])
        if ident in found:
            if where["shape"] not in found[ident][0].shapes:
                found[ident][0].shapes.append(where["shape"])
        else:
            found[ident] = (Launch(name, FAMILY.get(name, "other"), [where["shape"]], where["case"],
                                   dict(compile["signature"]), {str(k): v for k, v in compile["constants"].items()},
                                   compile["num_warps"], compile["num_stages"], ident), jit, compile)
        return True  # compiled later, per target; nothing is launched

    saved_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        for sname in shape_names:
            preset, batch = SHAPES[sname]
            m = get_preset(preset).model
            where["shape"] = sname
            n, length, p, c = batch, m.num_patches, m.patch_size, m.in_chans
            meta = dict(device="meta")
            for dt_name in DTYPES:
                dt = getattr(torch, dt_name)
                for ratio in MASK_RATIOS:
                    k = len_keep_for(length, ratio)
                    for with_pos in (True, False):
                        where["case"] = f"{dt_name}, mask {ratio}, pos {with_pos}"
                        x = torch.empty(n, length, m.embed_dim, dtype=dt, requires_grad=True, **meta)
                        pos = torch.empty(1, length, m.embed_dim, dtype=dt, **meta) if with_pos else None
                        out = random_masking_triton(x, ratio, torch.empty(n, length, **meta), pos)[0]
                        out.sum().backward()
                        for deterministic in (False, True):
                            torch.use_deterministic_algorithms(deterministic, warn_only=True)
                            try:
                                xd = torch.empty(n, k + 1, m.decoder_embed_dim, dtype=dt, requires_grad=True, **meta)
                                mt = torch.empty(1, 1, m.decoder_embed_dim, dtype=dt, requires_grad=True, **meta)
                                ids = torch.empty(n, length, dtype=torch.int64, **meta)
                                dpos = (torch.empty(1, length + 1, m.decoder_embed_dim, dtype=dt, **meta)
                                        if with_pos else None)
                                unshuffle_triton(xd, ids, mt, True, dpos).sum().backward()
                            finally:
                                torch.use_deterministic_algorithms(False)
                    tokens = k + 1
                    heads = m.num_heads
                    if dt_name == "float32" and not attention_fp32:
                        continue  # IEEE fp32 dot products: see ATTENTION_STACK_LIMIT; --attention-fp32 adds them
                    if supported(tokens, m.embed_dim // heads):  # the encoder's attention on the visible tokens
                        where["case"] = f"{dt_name}, {tokens} tokens"
                        qkv = torch.zeros(1, tokens, 3 * m.embed_dim, dtype=dt, requires_grad=True)
                        qkv_attention_triton(qkv, heads, (m.embed_dim // heads) ** -0.5).sum().backward()
                for norm_pix in (True, False):
                    for count in (True, False):
                        for in_forward in (True, False):
                            where["case"] = f"{dt_name} pred, norm_pix {norm_pix}, count {count}, grad in fwd {in_forward}"
                            imgs = torch.empty(n, c, m.img_size, m.img_size, **meta)
                            pred = torch.empty(n, length, p * p * c, dtype=dt, requires_grad=True, **meta)
                            mask = torch.empty(n, length, **meta)
                            loss = norm_pix_mse_triton(imgs, pred, mask, p, norm_pix, grad_in_forward=in_forward,
                                                       mask_count=n * (length - len_keep_for(length, 0.75))
                                                       if count else None)
                            loss.backward()
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver
    return list(found.values())


# --- compile and read the cubin ----------------------------------------------------------------------------------


def _cuobjdump() -> str:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.is_file() else "cuobjdump"


def resources(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the (one) function in a cubin, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    out = {}
    for tok in text.replace(",", " ").split():
        if ":" in tok:
            k, v = tok.split(":", 1)
            if k in ("REG", "STACK", "SHARED", "LOCAL") and v.isdigit():
                out[k.lower()] = int(v)
    return out


def occupancy(cc: int, regs: int, warps: int, shared: int) -> float:
    """Resident warps per SM / the SM's maximum, from registers (allocated per warp in units of 256), warps, blocks
    and shared memory."""
    lim = SM_LIMITS[cc]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * warps)
    by_warps = lim["warps"] // warps
    by_smem = lim["smem"] // shared if shared else lim["blocks"]
    blocks = min(by_regs, by_warps, lim["blocks"], by_smem)
    return blocks * warps / lim["warps"]


def compile_for(launch: Launch, jit, args: dict, target_name: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget

    cc = TARGETS[target_name]
    row = Compiled(launch.kernel, launch.family, target_name, launch.case, launch.shapes, launch.num_warps)
    try:
        src = triton.compiler.ASTSource(jit, args["signature"], args["constants"], args["configs"][0])
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": args["num_warps"], "num_stages": args["num_stages"],
                                    "num_ctas": args["num_ctas"], "enable_fp_fusion": args["enable_fp_fusion"]})
        res = resources(k.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a compile error is the finding
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        return row
    row.regs, row.stack, row.local = res.get("reg"), res.get("stack", 0), res.get("local", 0)
    row.shared = max(res.get("shared", 0), int(getattr(k.metadata, "shared", 0) or 0))
    row.occupancy = occupancy(cc, row.regs or 0, launch.num_warps, row.shared)
    return row


_FOUND: list = []  # the captured launches, shared with forked compile workers


def _compile_job(job: tuple[int, str]) -> Compiled:
    launch, jit, args = _FOUND[job[0]]
    return compile_for(launch, jit, args, job[1])


def run(shape_names, target_names, log=print, jobs: int = 0, attention_fp32: bool = False
        ) -> tuple[list[Launch], list[Compiled]]:
    """Capture, then compile every launch for every target (ptxas in `jobs` forked processes; Triton's cache makes
    a second run fast)."""
    global _FOUND
    import multiprocessing

    t0 = time.time()
    _FOUND = capture(shape_names, attention_fp32)
    log(f"{len(_FOUND)} distinct launches from the launchers at {', '.join(shape_names)} "
        f"({time.time() - t0:.1f} s); compiling for {', '.join(target_names)}")
    work = [(i, t) for i in range(len(_FOUND)) for t in target_names]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_compile_job, work, chunksize=1)
    else:
        rows = [_compile_job(w) for w in work]
    log(f"compiled {len(rows)} kernels in {time.time() - t0:.1f} s")
    return [f[0] for f in _FOUND], rows


# --- report ----------------------------------------------------------------------------------------------------


def report(rows: list[Compiled], shape_names, target_names, seconds: float) -> str:
    import platform

    import torch
    import triton

    from .common import today

    lines = [f"# Triton kernels compiled ahead of time for {', '.join(target_names)} (no GPU; {today()})", "",
             f"- produced on a CPU machine ({platform.processor() or platform.machine()}) by `mae bench kernels "
             f"--compile-only` in {seconds:.0f} s with Triton's compile cache as found (a cold cache runs ptxas once "
             "per launch and target: 294 s for this matrix on 2 cores, 2026-12-02); triton "
             f"{triton.__version__}, torch {torch.__version__}",
             "- the attention kernel in fp32 (IEEE dot products: the parity checks' precision, not a training "
             "precision of the kernel) is left out: about 1 MB of PTX and minutes of ptxas per configuration, and "
             "kilobytes of spills (ViT-L, sm_90: 18.8 KB forward, 24.9 KB backward at 99 tokens); `--attention-fp32` "
             "adds it",
             f"- shapes: {', '.join(f'{s} ({SHAPES[s][0]}, batch {SHAPES[s][1]})' for s in shape_names)}; mask ratios "
             f"{', '.join(map(str, MASK_RATIOS))}; {', '.join(DTYPES)} (attention: bf16 and fp16, see below); "
             "norm-pix on and off; with and without the "
             "position embedding; unshuffle's atomic and deterministic backward; the loss with its gradient in the "
             "forward and in the backward; attention on each visible-token count (main and tail tiles), forward "
             "and backward",
             "- each configuration is what the kernel's own launcher chose (captured at Triton's compile hook); "
             "registers, stack and shared memory read from the cubin with cuobjdump; occupancy = resident warps / "
             "the SM's maximum, from registers, warps and shared memory",
             "- compilation and resources only: speed and numerics are measured elsewhere (interpreter tests on the "
             "CPU, benchmarks/results/PENDING.md on a GPU)", ""]
    lines += ["## Where the interpreter (the CPU tests) and compiled code can differ, and what covers it", "",
              "- tail masks (lengths, widths and batches that are not multiples of a tile): the same `tl.load` / "
              "`tl.store` masks run in both; the interpreter tests use such shapes on purpose "
              "(`tests/test_kernels_triton.py::test_masking_matches_reference`, `test_unshuffle_matches_reference`, "
              "`test_loss_fp32_matches_reference`; `tests/test_kernels_attention.py::test_fp32_matches_reference` at "
              "lengths that use the tail tile).",
              "- `tl.dot` shapes under 16: the interpreter multiplies any shape, the GPU's MMA needs 16; the attention "
              "launcher never picks a tile under 16 (`tests/test_kernels_attention.py::"
              "test_two_tiles_cover_every_length_with_little_padding`), and every tile it picks compiles above for "
              "each target (a dot under 16 fails to compile).",
              "- integer overflow: the interpreter computes offsets in numpy's wide integers, the GPU in the pointer "
              "arithmetic's own width; every kernel forms its row offsets in int64 (`row.to(tl.int64)`), and the "
              "largest tensors at these shapes stay under 2^31 elements anyway:", ""]
    lines += _table(["shape", "batch", "largest tensor (elements)", "under 2^31"],
                      [[s, SHAPES[s][1], f"{_largest(s):,}", "yes" if _largest(s) < 2**31 else "NO"]
                       for s in shape_names])
    lines.append("")
    errors = [r for r in rows if r.error]
    spills = [r for r in rows if not r.error and (r.stack or r.local)]
    lines.append(f"**{len(rows)} compilations, {len(errors)} failed, {len(spills)} with stack use (spills).**")
    lines.append("")
    agg: dict[tuple, list[Compiled]] = {}
    for r in rows:
        agg.setdefault((r.kernel, r.target), []).append(r)
    table = []
    for (kernel, target), rs in sorted(agg.items(), key=lambda kv: (FAMILY.get(kv[0][0], ""), kv[0])):
        ok = [r for r in rs if not r.error]
        table.append([FAMILY.get(kernel, "?"), kernel, target, len(rs), len(rs) - len(ok),
                      f"{min(r.regs for r in ok)}-{max(r.regs for r in ok)}" if ok else "-",
                      max((r.stack or 0) for r in ok) if ok else "-", max((r.local or 0) for r in ok) if ok else "-",
                      max((r.shared or 0) for r in ok) if ok else "-",
                      "/".join(sorted({str(r.num_warps) for r in rs})),
                      f"{min(r.occupancy for r in ok):.0%}-{max(r.occupancy for r in ok):.0%}" if ok else "-"])
    lines += _table(["family", "kernel", "target", "configs", "failed", "registers", "max stack B", "max local B",
                       "max shared B", "warps", "occupancy"], table)
    if errors or spills:
        lines += ["", "## Failures and stack use", ""]
        lines += _table(["kernel", "target", "case", "shapes", "registers", "stack", "error"],
                          [[r.kernel, r.target, r.case, ",".join(r.shapes), r.regs, r.stack, r.error or ""]
                           for r in errors + spills])
    return "\n".join(lines) + "\n"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in rows)]


def _largest(shape_name: str) -> int:
    """The most elements any kernel argument holds at a shape (encoder tokens, decoder tokens, images, pred, qkv)."""
    from engine.config import get_preset

    preset, n = SHAPES[shape_name]
    m = get_preset(preset).model
    length = m.num_patches
    return max(n * length * m.embed_dim, n * (length + 1) * m.decoder_embed_dim, n * m.in_chans * m.img_size ** 2,
               n * length * m.patch_size ** 2 * m.in_chans, n * (length + 1) * 3 * m.embed_dim)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench kernels --compile-only", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--out", default=None, help="folder for kernels_compiled_<date>.md and .json "
                                                "(default ./bench-results)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file only (no report)")
    ap.add_argument("--jobs", type=int, default=0, help="compile processes (default: the cores)")
    ap.add_argument("--attention-fp32", action="store_true",
                    help="also the attention kernel in fp32 (IEEE dot products: about 1 MB of PTX per configuration, "
                         "minutes of ptxas each, kilobytes of spills; not a training precision of the kernel)")
    ap.add_argument("--from-json", default=None, help="write the report of rows saved by an earlier run (its .json)")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    targets = [t for t in args.targets.split(",") if t]
    bad = [s for s in shapes if s not in SHAPES] + [t for t in targets if t not in TARGETS]
    if bad:
        print(f"unknown shape or target: {', '.join(bad)} (shapes {', '.join(SHAPES)}; targets {', '.join(TARGETS)})",
              file=sys.stderr)
        return 2
    t0 = time.time()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        shapes, targets = data["shapes"], data["targets"]
        rows = [Compiled(**r) for r in data["rows"]]
        t0 -= data.get("seconds", 0.0)
    else:
        launches, rows = run(shapes, targets, log=lambda m: print(m, file=sys.stderr, flush=True), jobs=args.jobs,
                             attention_fp32=args.attention_fp32)
    data = {"shapes": shapes, "targets": targets, "seconds": round(time.time() - t0, 1),
            "rows": [asdict(r) for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
        return 1 if any(r.error for r in rows) else 0
    from .common import RESULTS, today

    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"kernels_compiled_{today()}.md"
    md.write_text(report(rows, shapes, targets, time.time() - t0))
    (out / f"kernels_compiled_{today()}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {md}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
