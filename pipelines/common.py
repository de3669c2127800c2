"""What every backend shares: file listing, the embedded sample photographs, crop sampling, sharding."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
QUARANTINE_NAME = ".mae_quarantine.txt"

# Colour photographs bundled inside scikit-image's wheel (no download).
EMBEDDED = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
            "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
EMBEDDED_SAMPLES_PER_EPOCH = 256
# photographs in the same wheel that the embedded training set leaves out (grayscale, shown to the model as RGB):
# what a run on the embedded set is scored on (`heldout_images`)
HELD_OUT = ("camera.png", "coins.png", "brick.png", "grass.png", "moon.png")


class DataError(RuntimeError):
    """Input data is missing or unusable; the message names the path."""


# -- ending loaders -----------------------------------------------------------------------------------------------
# DataLoader workers ignore stop signals (the main process checkpoints first), so nothing outside the loader can
# end them: at interpreter exit, multiprocessing would wait forever for a worker that was never told to stop. Every
# stream a loader hands out is tracked; a run closes its loaders when it ends, however it ends, and the streams
# still open at exit are closed before multiprocessing joins its children.

_OPEN_STREAMS = None  # a weakref.WeakSet once a stream exists (weakref imported then: this module stays light)


def tracked(gen, streams=None):
    """Register a loader's generator so that `close_streams` (a run's end, or interpreter exit) closes it, and in
    `streams` (the loader's own `weakref.WeakSet`, for its `close()`). Both hold it weakly: a loader holding its
    streams would form a cycle with them (a stream's frame holds its loader), and a dropped cycle is freed by the
    garbage collector, which finalises the workers' queues before the stream's `finally` can stop the workers
    through them (torch's own shutdown then waits 5 s per worker)."""
    global _OPEN_STREAMS
    if streams is not None:
        streams.add(gen)
    if _OPEN_STREAMS is None:
        import atexit
        import weakref

        _OPEN_STREAMS = weakref.WeakSet()
        atexit.register(close_streams)  # after multiprocessing's own exit hook was registered: runs before it
    _OPEN_STREAMS.add(gen)
    return gen


def close_streams(streams=None) -> None:
    """Close `streams` (default: every open one): each runs its `finally`, which stops its workers or pipelines."""
    for g in list((_OPEN_STREAMS or ()) if streams is None else streams):
        try:
            g.close()
        except ValueError:  # closing from inside the generator itself (a signal handler): its own exit ends it
            pass
        if _OPEN_STREAMS is not None:
            _OPEN_STREAMS.discard(g)


def stop_workers(it, grace_s: float = 5.0) -> None:
    """End a DataLoader iterator's worker processes now: each is told to stop, all are joined against one deadline,
    and any still alive after `grace_s` (stuck in a read: they ignore SIGTERM) is killed; then the iterator's own
    shutdown tidies its queues and threads."""
    import time

    workers = list(getattr(it, "_workers", None) or ())
    if workers:
        done = getattr(it, "_workers_done_event", None)
        if done is not None:
            done.set()
        for q in getattr(it, "_index_queues", None) or ():
            try:
                q.put(None)
            except (OSError, ValueError):  # a queue already closed
                pass
        deadline = time.monotonic() + grace_s
        try:
            for w in workers:
                w.join(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            # torch's SIGCHLD handler would raise "worker killed" in this thread for the kills below: unregister
            # the workers first (as the iterator's own shutdown does once they are gone)
            if getattr(it, "_worker_pids_set", False):
                from torch.utils.data._utils import signal_handling

                signal_handling._remove_worker_pids(id(it))
                it._worker_pids_set = False
            for w in workers:
                if w.is_alive():
                    w.kill()
            for w in workers:
                w.join(timeout=5.0)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - workers already gone
            pass


def atomic_write(path, write) -> Path:
    """write(binary file) into a temp file beside `path`, fsync, rename over it (a kill leaves the old file or
    the new one). The pipelines' own writer: they do not import the engine."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def embedded_images() -> list[str]:
    try:
        import skimage
    except ImportError as e:  # pragma: no cover - scikit-image is a dependency
        raise DataError("the embedded sample images come with scikit-image; install it or pass --data.path DIR") from e
    root = Path(skimage.__file__).parent / "data"
    files = [str(root / f) for f in EMBEDDED if (root / f).is_file()]
    if not files:
        raise DataError(f"no embedded sample photographs found in {root}; pass --data.path DIR")
    return files


def heldout_images(img_size: int, mean, std, crops=(0.5, 0.75, 1.0)):
    """The HELD_OUT photographs as a normalised batch [len(HELD_OUT) * len(crops), 3, img_size, img_size]: centre
    crops of each relative size, resized (bicubic) to img_size. Never trained on; the same every time."""
    import torch
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    try:
        import skimage
    except ImportError as e:  # pragma: no cover - scikit-image is a dependency
        raise DataError("the held-out photographs come with scikit-image; install it") from e
    root = Path(skimage.__file__).parent / "data"
    out = []
    for name in HELD_OUT:
        with Image.open(root / name) as im:
            im = im.convert("RGB")
        side = min(im.size)
        for frac in crops:
            c = int(side * frac)
            img = TF.resized_crop(im, (im.height - c) // 2, (im.width - c) // 2, c, c, [img_size, img_size],
                                  InterpolationMode.BICUBIC, antialias=True)
            out.append(TF.normalize(TF.to_tensor(img), list(mean), list(std)))
    return torch.stack(out)


def to_rgb(im):
    """A PIL image as 8-bit RGB. 16- and 32-bit greyscale (16-bit PNGs) is scaled to 8 bits by its bit depth;
    PIL's own convert("RGB") clips it, turning nearly every pixel white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np
        from PIL import Image

        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode != "F" and (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            top = max(1.0, float(a.max(initial=1.0)))
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return im.convert("RGB")


def read_quarantine(path: str | os.PathLike) -> set[str]:
    """The paths of a quarantine list: one JSON object per line ({"path": ..., "why": ...}: any file name, tabs and
    newlines included), or the older 'path<TAB>why' lines."""
    import json

    p = Path(path)
    if not p.is_file():
        raise DataError(f"quarantine list {p} does not exist")
    out = set()
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the quarantine list {p}: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("{"):
            try:
                path_ = json.loads(line)["path"]
                if not isinstance(path_, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{p} line {n}: not a quarantine entry ({line[:80]!r})") from None
            out.add(os.path.abspath(path_))
            continue
        line = line.split("\t")[0].strip()
        if line and not line.startswith("#"):
            out.add(os.path.abspath(line))
    return out


def walk_files(root: str | os.PathLike) -> list[str]:
    """Every non-hidden file under `root` (recursive, links followed), absolute paths in sorted order. Each real
    directory is entered once and each real file listed once (under the first path met): a link back up the tree
    or two links to one folder do not multiply the data set."""
    out, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            full = os.path.abspath(os.path.join(dirpath, f))
            try:
                fst = os.stat(full)
            except OSError:  # a dangling link: listed, so that the reader names it
                out.append(full)
                continue
            if (fst.st_dev, fst.st_ino) not in seen_files:
                seen_files.add((fst.st_dev, fst.st_ino))
                out.append(full)
    return out


def list_images(path: str, quarantine: str = "") -> tuple[list[str], list[str]]:
    """Image files under `path` (recursive, sorted), minus quarantined ones.

    Returns (images, skipped_non_images). Raises DataError when the directory is missing or has no images.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    images, others = [], []
    for full in walk_files(root):
        (images if full.lower().endswith(IMAGE_EXTS) else others).append(full)
    qfile = quarantine or (str(root / QUARANTINE_NAME) if (root / QUARANTINE_NAME).is_file() else "")
    if qfile:
        bad = read_quarantine(qfile)
        images = [f for f in images if f not in bad]
    if not images:
        raise DataError(f"no images found in {root} (looked recursively for {', '.join(IMAGE_EXTS)}"
                        + (f", after excluding the quarantine list {qfile}" if qfile else "") + ")")
    return images, others


def resolve_files(data_cfg) -> tuple[list[str], int, list[str]]:
    """(files, repeat, skipped) for a DataConfig: a directory, or the embedded photographs."""
    if data_cfg.path:
        files, skipped = list_images(data_cfg.path, data_cfg.quarantine)
        repeat = data_cfg.repeat or 1
    else:
        files, skipped = embedded_images(), []
        repeat = data_cfg.repeat or math.ceil(EMBEDDED_SAMPLES_PER_EPOCH / len(files))
    return files, repeat, skipped


def sample_crop(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (top, left, h, w), torchvision's algorithm with an explicit RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    # fallback: central crop with the aspect clamped to the range (at least one pixel a side: torchvision's
    # rounding gives a 0-pixel side for an image a few pixels across, which no resize accepts)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = max(1, int(round(w / min(ratio))))
    elif in_ratio > max(ratio):
        h = height
        w = max(1, int(round(h * max(ratio))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-sample augmentation RNG: a pure function of (seed, epoch, sample), so resume replays exactly."""
    return random.Random(f"mae:{seed}:{epoch}:{index}")


class EpochPlan:
    """Which samples each rank sees in which micro-batch, as a pure function of (seed, epoch).

    Every epoch is a fresh permutation of `num_samples` (= files x repeat) cut into global micro-batches
    of batch_size x world samples (the remainder dropped, so every rank has the same number of batches);
    rank r takes rows [r * batch_size, (r + 1) * batch_size) of each. A global micro-batch therefore holds
    the same samples whatever the world size, and a counter g maps to (epoch, batch) = divmod(g, batches).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.num_samples, self.batch_size, self.seed, self.rank, self.world = num_samples, batch_size, seed, rank, world
        self.batches_per_epoch = num_samples // (batch_size * world)
        if self.batches_per_epoch < 1:
            raise DataError(f"{num_samples} samples per epoch cannot fill one batch of {batch_size} on each of "
                            f"{world} rank(s); lower train.batch_size or raise data.repeat")

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's samples of `epoch`, in batch order."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        gb = self.batch_size * self.world
        perm = perm[:self.batches_per_epoch * gb].view(self.batches_per_epoch, self.world, self.batch_size)
        return perm[:, self.rank].reshape(-1).tolist()

    def batches(self, start: int = 0):
        """Yield [(epoch, sample_index), ...] batches forever from global micro-batch `start`."""
        epoch, b = divmod(start, self.batches_per_epoch)
        while True:
            idx = self.epoch_indices(epoch)
            for j in range(b, self.batches_per_epoch):
                yield [(epoch, i) for i in idx[j * self.batch_size:(j + 1) * self.batch_size]]
            epoch, b = epoch + 1, 0
