"""`mae bench loader`: images per second of each data backend, from loose files and from tar shards, and the
end-to-end training img/s of an MAE fed by each backend against synthetic on-device input.

Backends (the same augmentation everywhere: RandomResizedCrop(0.2-1, cubic) + flip + normalise):
  dali-gpu             DALI, `mixed` decode (nvJPEG; the hardware JPEG decoder takes DALI's default share 0.65)
  dali-gpu-nohw        the same with the hardware decoder off (hw_decoder_load 0: CUDA cores + CPU Huffman)
  dali-cpu             DALI's CPU pipeline (libjpeg-turbo), output on the host
  torchvision-uint8    the strongest CPU loader a user could write: PIL decode in DataLoader workers handing over
                       uint8 pixels, pinned memory, normalisation on the GPU (data.transfer uint8, our default)
  torchvision-float32  the paper's code: normalised float32 tensors from the workers (data.transfer float32)

Sets are generated (no download) and cached in --files-dir between runs: `imagenet`, about 500x375 and 110 KB
per JPEG (quality 90; at least 5,000 files for the report), and `large`, photos of about 3.5 MP (2304x1536).
`--sources shards` packs each set with `mae data pack` (pipelines.shards) and reads the shards.

    mae bench loader --out benchmarks/results                  # GPU machine: every backend, set and source
    mae bench loader --files 48 --batch 16 --img-size 64 --train-steps 0     # a quick CPU run (labelled CPU)

Reports: loader_<gpu|cpu>_<date>.{csv,json,md}. Every row of a report comes from the same process on the same
machine, so the ratios between rows (DALI over the strongest CPU loader, fed training over synthetic) hold.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS, device_tag, env_block, environment, md_table, parse_choices, pick_device, today, write_csv
from .common import write_json

BACKENDS = ("dali-gpu", "dali-gpu-nohw", "dali-cpu", "torchvision-uint8", "torchvision-float32")
GPU_BACKENDS = ("dali-gpu", "dali-gpu-nohw")
STRONGEST_CPU = "torchvision-uint8"
PAPER = "torchvision-float32"
SOURCES = ("files", "shards")
# name: (width, height, default count); the noise level sets ~110 KB per ImageNet-like file at quality 90
SETS = {"imagenet": (500, 375, 6000), "large": (2304, 1536, 600)}
TRAIN_FEEDS = ("synthetic",) + BACKENDS
# targets on one H100 machine (16 cores), issue 17: DALI GPU decode at the ImageNet-like size, its ratio over the
# strongest CPU loader in the same run, ViT-B/16 training fed by DALI against synthetic input
TARGET_DALI_GPU, TARGET_VS_CPU, TARGET_E2E = 14_000.0, 3.0, 0.95


def _make_jpeg(args):
    path, seed, w, h = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):  # a few smooth blobs and gradients: photo-like low frequencies
        for _ in range(4):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.5) * max(h, w)
            img[..., c] += rng.uniform(40, 120) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img[..., c] += rng.uniform(0, 80) * (xx / w)
    img += rng.normal(0, 28, img.shape)  # texture: sets the file size near 110 KB at 500x375, quality 90
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def make_jpeg_set(root: Path, n: int, workers: int, size: tuple[int, int] = (500, 375)) -> tuple[list[str], float]:
    """n generated JPEGs of `size` under root/class_k/ (reused when already there); returns (files, mean KB)."""
    files = [root / f"class_{i % 10}" / f"img_{i:06d}.jpg" for i in range(n)]
    missing = [(str(f), i, *size) for i, f in enumerate(files) if not f.is_file()]
    for k in range(10):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    if missing:
        print(f"generating {len(missing)} JPEGs of {size[0]}x{size[1]} in {root} ...", flush=True)
        with ProcessPoolExecutor(max(1, workers)) as ex:
            list(ex.map(_make_jpeg, missing, chunksize=16))
    sizes = [f.stat().st_size for f in files]
    return [str(f) for f in files], float(np.mean(sizes)) / 1024


def pack_set(root: Path, out: Path, workers: int) -> Path:
    """The set as tar shards (about 64 MB each, `mae data pack`); reused when a complete manifest is there."""
    from pipelines.shards import MANIFEST, pack

    if not (out / MANIFEST).is_file():
        pack(str(root), str(out), shard_bytes=64 << 20, check="none", workers=workers, progress=False,
             log=lambda m: None)
    return out


def data_config(backend: str, path: str, workers: int, repeat: int = 0):
    """The engine's DataConfig a run with this backend uses (the benchmark times exactly the trainer's loader)."""
    from engine.config import DataConfig

    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return DataConfig(path=path, backend="dali" if backend.startswith("dali") else "torchvision",
                      num_workers=workers, repeat=repeat,
                      hw_decoder_load=0.0 if backend == "dali-gpu-nohw" else DataConfig.hw_decoder_load,
                      transfer="float32" if backend == PAPER else "uint8")


def loader_for(backend: str, path: str, img_size: int, batch: int, workers: int, device: torch.device,
               repeat: int = 0):
    from pipelines import build_loader

    cfg = data_config(backend, path, workers, repeat)
    dev = torch.device("cpu") if backend == "dali-cpu" else device
    return build_loader(cfg, img_size, batch, dev, seed=0, quiet=True)


def _error(e: BaseException) -> str:
    text = str(e).splitlines()[0][:160] if str(e) else ""
    return f"error: {type(e).__name__}: {text}"


def time_loader(backend, path, img_size, batch, workers, device, batches: int, warmup: int = 3,
                n_files: int = 0, **labels) -> dict:
    """One row: `batches` timed batches after `warmup`, the set repeated as needed to supply them."""
    row = dict(labels, backend=backend, batch=batch, workers=workers, img_size=img_size)
    try:
        repeat = max(1, math.ceil((warmup + batches + 2) * batch / max(1, n_files))) if n_files else 0
        ld = loader_for(backend, path, img_size, batch, workers, device, repeat)
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
        row.update(status="ok", img_per_s=round(batches * batch / dt, 1), timed_batches=batches,
                   output_device=str(x.device), output_dtype=str(x.dtype).replace("torch.", ""))
        del s, ld
    except Exception as e:  # noqa: BLE001 - one backend failing does not stop the others
        row.update(status=_error(e))
    print(row, flush=True)
    return row


def _on_device(stream, device):
    for x in stream:
        yield x.to(device, non_blocking=True)


def time_training(feed, path, preset, batch, workers, device, steps: int, levers: str = "fast",
                  n_files: int = 0) -> dict:
    """End-to-end MAE training img/s fed by `feed` ('synthetic' = on-device random images), the lever set given."""
    from engine.config import get_preset

    from .levers import CONFIGS as LEVER_SETS
    from .step_runner import StepRunner

    m = get_preset(preset).model
    row = {"preset": preset, "feed": feed, "levers": levers, "batch": batch}
    try:
        stream = None
        if feed != "synthetic":
            repeat = max(1, math.ceil((steps + 8) * batch / max(1, n_files))) if n_files else 0
            stream = loader_for(feed, path, m.img_size, batch, workers, device, repeat).stream(0)
            if feed == "dali-cpu":
                stream = _on_device(stream, device)
        st = StepRunner(m, "mae", batch, device, 0.75, stream=stream, **LEVER_SETS[levers]).run(warmup=3, reps=steps)
        row.update(status="ok", img_per_s=round(batch / (st.step_ms / 1000), 1), step_ms=round(st.step_ms, 2),
                   step_p20_p80_ms=f"{st.p20_ms:.1f}-{st.p80_ms:.1f}")
    except Exception as e:  # noqa: BLE001
        row.update(status=_error(e))
    print(row, flush=True)
    return row


def targets(rows: list[dict], train_rows: list[dict], gpu: bool) -> list[dict]:
    """The issue's three targets from this run's rows (None where a row is missing or failed)."""
    def ips(backend, source="files", set_="imagenet"):
        return next((r.get("img_per_s") for r in rows if r["backend"] == backend and r["source"] == source
                     and r["set"] == set_ and r.get("status") == "ok"), None)

    def fed(preset, feed):
        return next((r.get("img_per_s") for r in train_rows if r["preset"] == preset and r["feed"] == feed
                     and r.get("status") == "ok"), None)

    g, c = ips("dali-gpu"), ips(STRONGEST_CPU)
    fb, sb = fed("mae_vit_base_patch16", "dali-gpu"), fed("mae_vit_base_patch16", "synthetic")
    out = [
        {"target": "DALI GPU decode, ImageNet-like files", "goal": f">= {TARGET_DALI_GPU:,.0f} img/s",
         "value": g, "shown": f"{g:,.0f} img/s" if g else None, "met": g >= TARGET_DALI_GPU if g else None},
        {"target": f"DALI GPU / {STRONGEST_CPU} (strongest CPU loader), same run", "goal": f">= {TARGET_VS_CPU}x",
         "value": g / c if g and c else None, "shown": f"{g / c:.2f}x" if g and c else None,
         "met": g / c >= TARGET_VS_CPU if g and c else None},
        {"target": "ViT-B/16 training fed by DALI GPU / synthetic input", "goal": f">= {TARGET_E2E:.0%}",
         "value": fb / sb if fb and sb else None, "shown": f"{fb / sb:.1%}" if fb and sb else None,
         "met": fb / sb >= TARGET_E2E if fb and sb else None},
    ]
    for t in out:
        t["verdict"] = ("yes" if t["met"] else "no") if t["met"] is not None else (
            "not measured" if gpu else "not measured (CPU run)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench loader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=0, help="JPEGs in the ImageNet-like set (default 6000; >= 5000 for "
                    "the report's targets)")
    ap.add_argument("--large-files", type=int, default=0, help="photos in the large set (default 600)")
    ap.add_argument("--files-dir", default="", help="where the sets are generated / reused (default: a temp dir)")
    ap.add_argument("--sets", default="imagenet,large", help=f"comma list of {', '.join(SETS)}")
    ap.add_argument("--sources", default=",".join(SOURCES), help="files (a directory of JPEGs), shards (packed)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers / DALI threads (default: the cores, "
                    "at most 16)")
    ap.add_argument("--batches", type=int, default=0, help="timed batches per row (default: one pass of the set, "
                    "at least 10)")
    ap.add_argument("--train-presets", default="mae_vit_base_patch16,mae_vit_large_patch16")
    ap.add_argument("--train-feeds", default="synthetic,dali-gpu,dali-gpu-nohw,torchvision-uint8,torchvision-float32",
                    help=f"comma list of {', '.join(TRAIN_FEEDS)}")
    ap.add_argument("--train-feeds-other", default="synthetic,dali-gpu,torchvision-uint8",
                    help="feeds of the presets after the first (the comparison rows only, to save device time)")
    ap.add_argument("--train-levers", default="fast", help="lever set of the fed training rows (benchmarks.levers)")
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=20, help="timed steps per fed-training row; 0 skips them")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    try:
        backends = parse_choices(args.backends, BACKENDS, "backend(s)")
        sets = parse_choices(args.sets, tuple(SETS), "set(s)")
        sources = parse_choices(args.sources, SOURCES, "source(s)")
        feeds = parse_choices(args.train_feeds, TRAIN_FEEDS, "training feed(s)")
        from engine.config import PRESETS

        from .levers import CONFIGS as LEVER_SETS

        presets = parse_choices(args.train_presets, tuple(PRESETS), "preset(s)")

        if args.train_levers not in LEVER_SETS:
            raise ValueError(f"unknown lever set {args.train_levers!r}; choose from {', '.join(LEVER_SETS)}")
    except ValueError as e:
        print(f"mae bench loader: error: {e}", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if not gpu:
        skipped = [b for b in backends if b in GPU_BACKENDS]
        if skipped:
            print(f"note: no GPU: skipping {', '.join(skipped)}", file=sys.stderr)
        backends = [b for b in backends if b not in GPU_BACKENDS]
        feeds = [f for f in feeds if f not in GPU_BACKENDS]
    from pipelines import dali_available

    if not dali_available():
        skipped = [b for b in backends if b.startswith("dali")]
        if skipped:
            print(f"note: DALI is not importable: skipping {', '.join(skipped)}", file=sys.stderr)
        backends = [b for b in backends if not b.startswith("dali")]
        feeds = [f for f in feeds if not f.startswith("dali")]
    workers = args.workers or min(16, os.cpu_count() or 1)
    import tempfile

    base = Path(args.files_dir or os.path.join(tempfile.gettempdir(), "mae_bench_jpegs"))
    env = environment(device)
    rows, set_info, train_rows, paths = [], {}, [], {}
    tag = f"loader_{device_tag(env)}_{today()}"
    out = Path(args.out)

    def write_report(final: bool = False) -> None:
        """Rewritten after every row, so the rows measured so far survive a time limit."""
        tgt = targets(rows, train_rows, gpu)
        rows.sort(key=lambda r: (sets.index(r["set"]), sources.index(r["source"]), backends.index(r["backend"])))
        train_rows.sort(key=lambda r: (presets.index(r["preset"]), feeds.index(r["feed"])))
        write_csv(rows + train_rows, out / f"{tag}.csv")
        write_json({"environment": env, "sets": set_info, "workers": workers, "loader": rows, "training": train_rows,
                    "targets": tgt}, out / f"{tag}.json")
        where = env.get("device") if gpu else f"CPU: {env.get('device')}, {os.cpu_count()} cores"
        lines = [f"# Data loading ({where}, {env['date']})", "", env_block(env), ""]
        if not final:
            lines += ["**Incomplete**: the run stopped before its last row.", ""]
        if not gpu:
            lines += ["**CPU figures** (no GPU in this run): the backends that run on a host only; they say nothing of "
                      "the GPU targets below.", ""]
        lines += [f"RandomResizedCrop(0.2-1, cubic) to {args.img_size} + flip + normalise, batch {args.batch}, "
                  f"{workers} DataLoader workers / DALI threads, 3 warm-up batches then the timed ones; files are "
                  "in the page cache after generation (decode is timed, not the disk).", "",
                  md_table([{"set": k, **v} for k, v in set_info.items()],
                           ["set", "files", "size", "mean_kb", "timed_batches"]), "",
                  md_table(rows, ["set", "source", "backend", "status", "img_per_s", "output_device", "output_dtype"])]
        if train_rows:
            lines += ["", f"## Training fed by each loader, lever set `{args.train_levers}`, batch {args.train_batch}, "
                      "bf16 autocast, mask 0.75", "",
                      md_table(train_rows, ["preset", "feed", "status", "img_per_s", "step_ms", "step_p20_p80_ms"])]
        lines += ["", "## Targets (one H100 machine, 16 cores)", "", "| target | goal | measured | met |",
                  "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['goal']} | {t['shown'] or '-'} | {t['verdict']} |" for t in tgt]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
        if final:
            print(f"wrote {out / (tag + '.md')}")

    for name in sets:
        w, h, default_n = SETS[name]
        n = (args.files if name == "imagenet" else args.large_files) or default_n
        root = base / f"{name}_{w}x{h}_{n}"
        files, mean_kb = make_jpeg_set(root, n, workers, (w, h))
        batches = args.batches or max(10, n // args.batch - 4)
        set_info[name] = {"files": n, "size": f"{w}x{h}", "mean_kb": round(mean_kb, 1), "timed_batches": batches}
        paths[name, "files"] = str(root)
        if "shards" in sources:
            paths[name, "shards"] = str(pack_set(root, base / f"{root.name}_shards", workers))
    train_n = args.files or SETS["imagenet"][2]
    train_root = base / f"imagenet_{SETS['imagenet'][0]}x{SETS['imagenet'][1]}_{train_n}"
    train = bool(args.train_steps and gpu and feeds)
    if train:
        make_jpeg_set(train_root, train_n, workers, SETS["imagenet"][:2])
    other = set(parse_choices(args.train_feeds_other, TRAIN_FEEDS, "training feed(s)"))

    def loader_rows(group):
        for b in group:
            for name in sets:
                for source in sources:
                    rows.append(time_loader(b, paths[name, source], args.img_size, args.batch, workers, device,
                                            set_info[name]["timed_batches"], n_files=set_info[name]["files"],
                                            set=name, source=source))
                    write_report()

    def training_rows(group):
        for feed in group:
            for i, preset in enumerate(presets):
                if i and feed not in other:
                    continue
                train_rows.append(time_training(feed, str(train_root), preset, args.train_batch, workers, device,
                                                args.train_steps, args.train_levers, n_files=train_n))
                write_report()

    # DataLoader workers are forked: every row with torchvision workers runs before the first DALI pipeline
    # exists in this process (a fork after DALI's thread pools started crashed or hung the workers)
    loader_rows([b for b in backends if not b.startswith("dali")])
    if train:
        training_rows([f for f in feeds if not f.startswith("dali")])
    loader_rows([b for b in backends if b.startswith("dali")])
    if train:
        training_rows([f for f in feeds if f.startswith("dali")])
    write_report(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
