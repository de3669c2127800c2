"""`mae bench loader`: images per second of each data backend on an ImageNet-like JPEG set, and the
end-to-end training img/s of an MAE fed by each backend against synthetic on-device input.

The set is generated (no download): JPEGs of about 500x375 pixels and about 110 KB each (smooth scenes
plus texture, quality 90), at least 5,000 files by default, cached in --files-dir between runs.

    mae bench loader --out benchmarks/results                  # GPU machine: all backends
    mae bench loader --files 200 --backends torchvision,dali-cpu --train-steps 0   # a quick CPU run

Reports: loader_<gpu>_<date>.{csv,json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .common import pick_device, parse_choices, RESULTS, device_tag, env_block, environment, md_table, today, write_csv, write_json

BACKENDS = ("dali-gpu", "dali-cpu", "torchvision")
# targets on one H100 machine (16 cores), against references measured there (../DESIGN.md)
TARGET_DALI_GPU, TARGET_VS_TORCHVISION, TARGET_E2E = 14_000.0, 9.0, 0.95


def _make_jpeg(args):
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 375, 500
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):  # a few smooth blobs and gradients: photo-like low frequencies
        for _ in range(4):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(40, 200)
            img[..., c] += rng.uniform(40, 120) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img[..., c] += rng.uniform(0, 80) * (xx / w)
    img += rng.normal(0, 28, img.shape)  # texture: sets the file size near 110 KB at quality 90
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def make_jpeg_set(root: Path, n: int, workers: int) -> tuple[list[str], float]:
    """n ImageNet-like JPEGs under root/class_k/ (reused when already there); returns (files, mean KB)."""
    files = [root / f"class_{i % 10}" / f"img_{i:06d}.jpg" for i in range(n)]
    missing = [(str(f), i) for i, f in enumerate(files) if not f.is_file()]
    for k in range(10):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    if missing:
        print(f"generating {len(missing)} JPEGs in {root} ...", flush=True)
        with ProcessPoolExecutor(max(1, workers)) as ex:
            list(ex.map(_make_jpeg, missing, chunksize=64))
    sizes = [f.stat().st_size for f in files]
    return [str(f) for f in files], float(np.mean(sizes)) / 1024


def loader_for(backend: str, root: str, img_size: int, batch: int, workers: int, device: torch.device):
    from engine.config import DataConfig
    from pipelines import build_loader

    cfg = DataConfig(path=root, backend="torchvision" if backend == "torchvision" else "dali", num_workers=workers)
    dev = device if backend != "dali-cpu" else torch.device("cpu")
    return build_loader(cfg, img_size, batch, dev, seed=0, quiet=True)


def time_loader(backend, root, img_size, batch, workers, device, batches: int, warmup: int = 3) -> dict:
    row = {"backend": backend, "batch": batch, "workers": workers, "img_size": img_size}
    try:
        ld = loader_for(backend, root, img_size, batch, workers, device)
        s = ld.stream(0)
        for _ in range(warmup):
            next(s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            x = next(s)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        dt = time.perf_counter() - t0
        row.update(status="ok", img_per_s=round(batches * batch / dt, 1), output_device=str(x.device))
    except Exception as e:  # noqa: BLE001 - one backend failing does not stop the others
        row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    print(row, flush=True)
    return row


def time_training(backend, root, preset, batch, workers, device, steps: int) -> dict:
    """End-to-end MAE training img/s fed by `backend` ('synthetic' = on-device random images)."""
    from engine.config import get_preset

    from .step import StepRunner

    m = get_preset(preset).model
    row = {"preset": preset, "feed": backend, "batch": batch}
    try:
        stream = None if backend == "synthetic" else loader_for(backend, root, m.img_size, batch, workers,
                                                                device).stream(0)
        st = StepRunner(m, "mae", batch, device, 0.75, stream=stream).run(warmup=3, reps=steps)
        row.update(status="ok", img_per_s=round(batch / (st.step_ms / 1000), 1), step_ms=round(st.step_ms, 2))
    except Exception as e:  # noqa: BLE001
        row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench loader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=6000, help="JPEGs in the generated set (>= 5000 for the report)")
    ap.add_argument("--files-dir", default="", help="where the set is generated / reused (default: a temp dir)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers / DALI threads (default: all cores)")
    ap.add_argument("--batches", type=int, default=0, help="timed batches per backend (default: one pass of the set)")
    ap.add_argument("--train-preset", default="mae_vit_base_patch16")
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=20, help="0 skips the end-to-end training comparison")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--device-suite", action="store_true", help="the GPU run of benchmarks/device_check.sh")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    try:
        backends = parse_choices(args.backends, BACKENDS, "backend(s)")
    except ValueError as e:
        print(f"mae bench loader: error: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda" and "dali-gpu" in backends:
        print("note: no GPU: skipping dali-gpu", file=sys.stderr)
        backends.remove("dali-gpu")
    workers = args.workers or (os.cpu_count() or 1)
    import tempfile

    root = Path(args.files_dir or os.path.join(tempfile.gettempdir(), "mae_bench_jpegs"))
    files, mean_kb = make_jpeg_set(root, args.files, workers)
    env = environment(device)
    batches = args.batches or max(1, len(files) // args.batch - 4)
    rows = [time_loader(b, str(root), args.img_size, args.batch, workers, device, batches) for b in backends]
    train_rows = []
    if args.train_steps and device.type == "cuda":
        feeds = ["synthetic"] + [b for b in backends if b != "dali-cpu"]
        train_rows = [time_training(b, str(root), args.train_preset, args.train_batch, workers, device,
                                    args.train_steps) for b in feeds]
    tag = f"loader_{device_tag(env)}_{today()}"
    out = Path(args.out)
    write_csv(rows + train_rows, out / f"{tag}.csv")
    write_json({"environment": env, "files": len(files), "mean_kb": mean_kb, "loader": rows, "training": train_rows},
               out / f"{tag}.json")
    ips = {r["backend"]: r.get("img_per_s") for r in rows}
    lines = [f"# Data loading ({env.get('device')}, {env['date']})", "", env_block(env), "",
             f"{len(files)} generated JPEGs, about 500x375, mean {mean_kb:.0f} KB; RandomResizedCrop(0.2-1, "
             f"cubic) to {args.img_size} + flip + normalise, batch {args.batch}, {workers} workers/threads, "
             f"{batches} timed batches after 3 warm-up.", "",
             md_table(rows, ["backend", "batch", "workers", "status", "img_per_s", "output_device"])]
    if train_rows:
        lines += ["", f"## End-to-end training, {args.train_preset}, batch {args.train_batch}, bf16", "",
                  md_table(train_rows, ["preset", "feed", "batch", "status", "img_per_s", "step_ms"])]
    lines += ["", "## Targets (one H100 machine, 16 cores)", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    g, t = ips.get("dali-gpu"), ips.get("torchvision")
    lines.append(f"| DALI GPU decode img/s | {TARGET_DALI_GPU:.0f} | {g or 'not measured'} | "
                 f"{'-' if not g else ('yes' if g >= TARGET_DALI_GPU else f'no (gap {TARGET_DALI_GPU - g:.0f})')} |")
    ratio = g / t if g and t else None
    lines.append(f"| DALI GPU vs torchvision | {TARGET_VS_TORCHVISION}x | "
                 f"{f'{ratio:.1f}x' if ratio else 'not measured'} | "
                 f"{'-' if not ratio else ('yes' if ratio >= TARGET_VS_TORCHVISION else 'no')} |")
    tr = {r["feed"]: r.get("img_per_s") for r in train_rows}
    e2e = tr.get("dali-gpu") / tr["synthetic"] if tr.get("dali-gpu") and tr.get("synthetic") else None
    lines.append(f"| training fed by DALI / synthetic | >= {TARGET_E2E:.0%} | "
                 f"{f'{e2e:.1%}' if e2e else 'not measured'} | "
                 f"{'-' if not e2e else ('yes' if e2e >= TARGET_E2E else 'no')} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
