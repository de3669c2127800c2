"""DALI's GPU decode (`mixed`: nvJPEG, with the hardware JPEG decoder on and off) held to DALI's CPU decode: the
same augmentation, by its statistics. A GPU decoder that drew crops differently, flipped at another rate or
shifted the pixels would train a different model while every speed figure looked fine.

    PYTHONPATH=. python3 -m benchmarks.dali_parity --out $OUT      # a GPU machine with DALI: mixed vs CPU
    mae bench dali-parity                                           # no GPU: DALI CPU vs torchvision

Checks, candidate against reference (the reference is DALI's CPU pipeline):
  crops    RandomResizedCrop's draw: mean area, area quantiles 10/50/90 %, mean and spread of log aspect, over
           1,000 crops of 600x400 JPEGs (the embedded photographs, re-encoded at quality 90)
  flips    the share of mirrored images over 256 draws at hflip 0.5, and exact mirrors at hflip 1
  pixels   per-channel mean and std of normalised training batches (256 images)
  decode   the deterministic path (whole image, resize, no flip): mean absolute difference per image, in
           normalised units (nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg-turbo's)

Report: dali_parity_<gpu|cpu>_<date>.{json,md}; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS, device_tag, env_block, environment, md_table, pick_device, today, write_json

W, H = 600, 400
# tolerances: what two correct implementations of the same augmentation differ by at these sample counts
# (binomial / sampling noise of 1,000 crops, 256 flips, 256 images), with margin
TOL = {"area_mean": 0.04, "area_q": 0.08, "log_aspect_mean": 0.04, "log_aspect_std": 0.04, "flip_share": 0.15,
       "mirror_exact": 1e-5, "channel_mean": 0.08, "channel_std": 0.08, "decode_mean_abs": 0.03}


def photo_jpegs(root: Path) -> list[str]:
    """The embedded photographs as 600x400 JPEGs at quality 90 (real content; one size, so crop draws compare)."""
    from PIL import Image

    from pipelines import embedded_images

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for f in embedded_images():
        with Image.open(f) as im:
            img = im.convert("RGB")
        s = max(W / img.width, H / img.height)
        img = img.resize((max(W, round(img.width * s)), max(H, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - W) // 2, (img.height - H) // 2
        p = root / (Path(f).stem + ".jpg")
        img.crop((left, top, left + W, top + H)).save(p, quality=90)
        out.append(str(p))
    return out


def left_right_jpeg(root: Path) -> str:
    """Bright left half, dark right half: a mirror is unmistakable."""
    from PIL import Image

    a = np.zeros((H, W, 3), np.uint8)
    a[:, : W // 2] = 220
    a[:, W // 2:] = 20
    p = root / "left_right.jpg"
    Image.fromarray(a).save(p, quality=95)
    return str(p)


def _loader(kind: str, files, device, hw: float, batch: int, seed: int, deterministic=False, **data):
    from engine.config import DataConfig
    from pipelines.dali import DaliLoader
    from pipelines.torchvision import TorchvisionLoader

    cfg = DataConfig(backend=kind, num_workers=2, hw_decoder_load=hw, transfer="float32", **data)
    repeat = max(1, math.ceil(4 * batch / len(files)))
    if kind == "dali":
        return DaliLoader(files, repeat, 64, batch, cfg, seed, device, deterministic=deterministic)
    return TorchvisionLoader(files, repeat, 64, batch, cfg, seed, device, deterministic=deterministic)


def crop_stats(sizes) -> dict:
    area = np.array([h * w / (W * H) for h, w in sizes])
    asp = np.array([math.log(w / h) for h, w in sizes])
    q = np.quantile(area, [0.1, 0.5, 0.9])
    return {"area_mean": float(area.mean()), "area_q10": float(q[0]), "area_q50": float(q[1]),
            "area_q90": float(q[2]), "log_aspect_mean": float(asp.mean()), "log_aspect_std": float(asp.std()),
            "crops": len(sizes)}


def collect(kind: str, device, files: list[str], lr_file: str, hw: float = 0.65, seed: int = 0) -> dict:
    """The statistics of one implementation: kind 'dali' (device cpu: DALI's CPU decoders; cuda: `mixed`) or
    'torchvision'; hw is DALI's hardware-decoder share (mixed only)."""
    device = torch.device(device)
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    if kind == "dali":
        from pipelines.dali import crop_sizes

        sizes = crop_sizes(files, scale, ratio, n_batches=40, batch_size=25, seed=seed,
                           device=device if device.type == "cuda" else None, hw_decoder_load=hw)
    else:
        from pipelines.common import sample_crop

        rng = random.Random(seed)
        sizes = [sample_crop(W, H, scale, ratio, rng)[2:] for _ in range(1000)]
    stats = crop_stats(sizes)
    # flips: whole-image crops of the left/right picture, so only the mirror varies
    flip = dict(scale=(1.0, 1.0), ratio=(1.5, 1.5))
    half = torch.cat([next(_loader(kind, [lr_file], device, hw, 64, seed + k, hflip=0.5, **flip).stream(0)).float()
                      .cpu() for k in range(4)])
    left, right = half[..., :32].mean((1, 2, 3)), half[..., 32:].mean((1, 2, 3))
    stats["flip_share"] = float((left < right).float().mean())
    never = next(_loader(kind, [lr_file], device, hw, 16, seed, hflip=0.0, **flip).stream(0)).float().cpu()
    every = next(_loader(kind, [lr_file], device, hw, 16, seed, hflip=1.0, **flip).stream(0)).float().cpu()
    stats["mirror_exact"] = float((every - never.flip(-1)).abs().max())
    # pixels after normalisation, over training batches
    s = _loader(kind, files, device, hw, 64, seed).stream(0)
    px = torch.cat([next(s).float().cpu() for _ in range(4)])
    stats["channel_mean"] = [round(float(v), 5) for v in px.mean((0, 2, 3))]
    stats["channel_std"] = [round(float(v), 5) for v in px.std((0, 2, 3))]
    # the deterministic path, image by image (kept for `decode`, compared against the reference's)
    stats["_deterministic"] = torch.cat([next(_loader(kind, [f], device, hw, 1, seed, deterministic=True).stream(0))
                                         .float().cpu() for f in files])
    return stats


def compare(cand: dict, ref: dict) -> list[dict]:
    """One row per check: the candidate's value, the reference's, the tolerance and the verdict."""
    rows = []

    def add(check, c, r, tol, diff=None):
        d = abs(c - r) if diff is None else diff
        rows.append({"check": check, "candidate": round(c, 5), "reference": round(r, 5), "diff": round(d, 5),
                     "tolerance": tol, "ok": bool(d <= tol)})

    add("crop area, mean", cand["area_mean"], ref["area_mean"], TOL["area_mean"])
    for q in ("q10", "q50", "q90"):
        add(f"crop area, {q}", cand[f"area_{q}"], ref[f"area_{q}"], TOL["area_q"])
    add("crop log aspect, mean", cand["log_aspect_mean"], ref["log_aspect_mean"], TOL["log_aspect_mean"])
    add("crop log aspect, std", cand["log_aspect_std"], ref["log_aspect_std"], TOL["log_aspect_std"])
    add("flip share at 0.5", cand["flip_share"], ref["flip_share"], TOL["flip_share"])
    add("hflip 1 is the exact mirror of hflip 0", cand["mirror_exact"], 0.0, TOL["mirror_exact"])
    for c in range(len(ref["channel_mean"])):
        add(f"channel {c} mean", cand["channel_mean"][c], ref["channel_mean"][c], TOL["channel_mean"])
        add(f"channel {c} std", cand["channel_std"][c], ref["channel_std"][c], TOL["channel_std"])
    a, b = cand.get("_deterministic"), ref.get("_deterministic")
    if a is not None and b is not None:
        per_image = (a - b).abs().mean((1, 2, 3))
        worst = float(per_image.max())
        add("deterministic decode, worst image mean abs diff", worst, 0.0, TOL["decode_mean_abs"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench dali-parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from pipelines import dali_available

    if not dali_available():
        print("mae bench dali-parity: error: DALI is not importable here (pip install nvidia-dali-cuda130)",
              file=sys.stderr)
        return 2
    device = pick_device(args.device)
    env = environment(device)
    with tempfile.TemporaryDirectory() as tmp:
        files = photo_jpegs(Path(tmp) / "photos")
        lr = left_right_jpeg(Path(tmp))
        ref = collect("dali", "cpu", files, lr)
        if device.type == "cuda":
            cands = {"DALI mixed, hardware decoder share 0.65": collect("dali", device, files, lr, 0.65),
                     "DALI mixed, hardware decoder off": collect("dali", device, files, lr, 0.0)}
        else:
            cands = {"torchvision (no GPU here)": collect("torchvision", "cpu", files, lr)}
    results = {name: compare(c, ref) for name, c in cands.items()}
    ok = all(r["ok"] for rows in results.values() for r in rows)
    tag = f"dali_parity_{device_tag(env)}_{today()}"
    out = Path(args.out)
    write_json({"environment": env, "reference": "DALI CPU", "tolerances": TOL, "ok": ok,
                "results": results}, out / f"{tag}.json")
    lines = [f"# DALI decode parity ({env.get('device')}, {env['date']})", "", env_block(env), "",
             f"Reference: DALI's CPU pipeline. {len(files)} embedded photographs as 600x400 JPEGs; 1,000 crops, "
             "256 flips, 256 normalised images, the deterministic path image by image. Verdict: "
             f"**{'all checks pass' if ok else 'FAILED'}**.", ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", md_table(rows, ["check", "candidate", "reference", "diff", "tolerance", "ok"]), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
