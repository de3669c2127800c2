"""DALI backend: decode and MAE augmentation on the GPU (nvJPEG through `device="mixed"`, the hardware
JPEG decoder where the GPU has one), handed to torch without a host round trip; the same pipeline runs
CPU-only (`device_id=None`, CPU decoders) on machines without a GPU, which is how CI tests it.

Augmentation (kept apart from the reader, as in DALI's examples): image_random_crop with the paper's area
(0.2, 1.0) and aspect (3/4, 4/3), cubic resize to the model's size, random horizontal flip and the
configured mean/std fused in crop_mirror_normalize, NCHW output in fp32 (or bf16).

Reader: fn.readers.file over the file list (pre-shuffled once with the run's seed, so contiguous shards
are random subsets), sharded by rank with random_shuffle and pad_last_batch; the iterator drops the last
partial batch, so every rank runs the same number of batches. Augmentation seeds differ per rank.
Resume: the pipeline is built with checkpointing on, the iterator's checkpoint (which accounts for
prefetched batches) is saved with the training state, and a run restored with the same world size
continues with the next unseen batch; without a usable checkpoint the loader replays the epoch's batches.
"""

from __future__ import annotations

import random
import sys
import weakref

import torch

from .common import IMAGE_EXTS, DataError


# Set once this process has used DALI: its worker threads are then running, and a process forked from this one
# (torchvision's DataLoader workers) can crash in them; pipelines.torchvision starts its workers by forkserver then.
USED = False


def _dali():
    global USED
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:  # pragma: no cover - checked by build_loader
        raise DataError("DALI is not importable; install nvidia-dali-cuda130 or use --data.backend torchvision") from e
    USED = True
    return fn, pipeline_def, types, LastBatchPolicy, DALIGenericIterator


def random_crop_decode(fn, types, encoded, scale, ratio, decode_device, hw_decoder_load=0.65):
    """Decode only a random crop of area `scale` x image and aspect in `ratio` (RandomResizedCrop's draw)."""
    hw = {"hw_decoder_load": hw_decoder_load} if decode_device == "mixed" else {}
    return fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                         random_area=list(scale), random_aspect_ratio=list(ratio), num_attempts=10,
                                         **hw)


def augment(fn, types, encoded, img_size, scale, ratio, hflip, mean, std, decode_device, out_dtype,
            deterministic=False, hw_decoder_load=0.65):
    """Decode + RandomResizedCrop + flip + normalise; encoded bytes in, CHW normalised out."""
    if deterministic:  # full image, plain resize, no flip (parity tests)
        hw = {"hw_decoder_load": hw_decoder_load} if decode_device == "mixed" else {}
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **hw)
        mirror = 0
    else:
        images = random_crop_decode(fn, types, encoded, scale, ratio, decode_device, hw_decoder_load)
        mirror = fn.random.coin_flip(probability=hflip)
    images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_CUBIC,
                       antialias=True)
    return fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], mirror=mirror)


class DaliLoader:
    name = "dali"

    def __init__(self, files, repeat, img_size, batch_size, data_cfg, seed, device, rank=0, world=1,
                 num_threads: int | None = None, deterministic=False, out_dtype: str = "float32", shards=None):
        fn, pipeline_def, types, LastBatchPolicy, DALIGenericIterator = _dali()
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        self.shards = shards  # a packed dataset (pipelines/shards.py): fn.readers.webdataset over its shards
        if shards is not None and shards.outside:  # DALI reads past a tar's end without a message, and crashes
            raise DataError(f"{shards.outside[0]}; {len(shards.outside)} index entr"
                            f"{'y lies' if len(shards.outside) == 1 else 'ies lie'} outside their tar (a truncated "
                            "shard, or an index of another tar): pack again, or read the set with "
                            "--data.backend torchvision, which skips those members")
        self.files = list(files) * max(1, repeat)
        random.Random(seed).shuffle(self.files)  # contiguous shards become random subsets
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.num_samples = len(self.files) if shards is None else len(shards) * max(1, repeat)
        per_shard = -(-self.num_samples // world)  # pad_last_batch: every shard counts ceil(n / world)
        self.batches_per_epoch = per_shard // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(f"{self.num_samples} samples cannot fill one batch of {batch_size} on each of {world} "
                            "rank(s); lower train.batch_size or raise data.repeat")
        self._types = types
        dali_dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}.get(
            "float16" if out_dtype == "bfloat16" else out_dtype)
        self.out_dtype = getattr(torch, out_dtype)
        device_id = (self.device.index or 0) if gpu else None
        threads = num_threads or max(1, data_cfg.workers())

        exts = ";".join(sorted({e.lstrip(".") for e in IMAGE_EXTS}))

        @pipeline_def(enable_checkpointing=True)
        def mae_pipeline():
            if shards is not None:  # tar shards with their index files; the image member, whatever its format
                encoded = fn.readers.webdataset(
                    paths=[str(p) for p in shards.shards] * max(1, repeat),
                    index_paths=[str(p) for p in shards.indices] * max(1, repeat), ext=[exts],
                    missing_component_behavior="error", shard_id=rank, num_shards=world, random_shuffle=True,
                    pad_last_batch=True, seed=seed, name="Reader")
                index = fn.constant(idata=-1, dtype=types.INT64)  # a shard's samples are named on failure instead
            else:
                # the label is the file's index: the loader knows what each rank has read (see _decode_error)
                encoded, index = fn.readers.file(files=self.files, labels=list(range(len(self.files))),
                                                 shard_id=rank, num_shards=world, random_shuffle=True,
                                                 pad_last_batch=True, seed=seed, name="Reader")
            return augment(fn, types, encoded, img_size, data_cfg.scale, data_cfg.ratio, data_cfg.hflip,
                           data_cfg.mean, data_cfg.std, "mixed" if gpu else "cpu", dali_dtype, deterministic,
                           data_cfg.hw_decoder_load), index

        def make_pipe(checkpoint=None):
            return mae_pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                                seed=seed * 1000 + 7 * rank + 1, prefetch_queue_depth=2, checkpoint=checkpoint)

        self._make_pipe = make_pipe
        self._iter_cls, self._policy = DALIGenericIterator, LastBatchPolicy
        self._checkpoint: str | None = None
        self._it = None
        self._streams = weakref.WeakSet()  # held weakly: see pipelines.common.tracked
        self.replayed = 0  # batches read and dropped to reach a resume position (0 when the state was used)
        self._read = set()  # indices into self.files read this epoch by this rank
        self._in_epoch = 0

    # -- resume --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The iterator's DALI checkpoint (consumed batches only), for the training checkpoint."""
        if self._it is None:
            return {"dali": self._checkpoint, "world": self.world}
        return {"dali": self._it.checkpoints()[0], "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state and state.get("world") == self.world and state.get("dali"):
            self._checkpoint = state["dali"]

    # -- iteration -----------------------------------------------------------------------------------------

    def _build(self):
        pipe = self._make_pipe(self._checkpoint)
        pipe.build()
        return self._iter_cls([pipe], ["images", "index"], reader_name="Reader", auto_reset=True,
                              last_batch_policy=self._policy.DROP)

    def _unread_candidates(self) -> list[str]:
        """Files this rank may read next: its shard (DALI shards the list contiguously) minus what it read this
        epoch, then the other shards (a resume may have read this epoch before this process started). For packed
        data: its samples as (shard, offset, size, "shard:member") in this rank's share first."""
        if self.shards is not None:
            n, w = len(self.shards), self.world
            lo, hi = n * self.rank // w, n * (self.rank + 1) // w
            order = list(range(lo, hi)) + [i for i in range(n) if not lo <= i < hi]
            s = self.shards
            return [(str(s.shards[s.samples[i].shard]), s.samples[i].offset, s.samples[i].size, s.name(i))
                    for i in order]
        n, w = len(self.files), self.world
        lo, hi = n * self.rank // w, n * (self.rank + 1) // w
        mine = [i for i in range(lo, hi) if i not in self._read]
        rest = [i for i in range(n) if not lo <= i < hi]
        return list(dict.fromkeys(self.files[i] for i in mine + rest))

    def stream(self, start: int = 0):
        """Batches [B, C, H, W] on the device, forever; resumes from the DALI checkpoint when one was loaded,
        else replays `start` batches (read and dropped) to reach the same position."""
        from .common import tracked

        return tracked(self._stream(start), self._streams)

    def close(self) -> None:
        """Shut the pipeline's threads down now (its position is kept: state_dict still answers, and a new stream
        continues from it)."""
        from .common import close_streams

        close_streams(self._streams)
        it, self._it = self._it, None
        if it is None:
            return
        try:
            self._checkpoint = it.checkpoints()[0]
        except Exception:  # noqa: BLE001 - a pipeline built without checkpointing, or one that failed
            pass
        for pipe in getattr(it, "_pipes", None) or ():
            pipe._shutdown()

    def _stream(self, start: int):
        restored = self._checkpoint is not None
        try:
            self._it = self._build()  # the iterator runs the pipeline ahead: decode errors can surface here
        except RuntimeError as e:
            raise _decode_error(e, self._unread_candidates()) from None
        skip = 0 if restored else start
        self._in_epoch = 0 if restored else start % self.batches_per_epoch
        if skip:
            print(f"note: DALI loader replays {skip} batch(es) to reach the resume position", file=sys.stderr)
        while True:
            for out in _named_errors(self._it, self._unread_candidates):
                if self._in_epoch % self.batches_per_epoch == 0:
                    self._read.clear()
                self._in_epoch += 1
                if self.shards is None:
                    self._read.update(out[0]["index"].reshape(-1).tolist())
                if skip:
                    skip -= 1
                    self.replayed += 1
                    continue
                imgs = out[0]["images"]
                if imgs.device != self.device:
                    imgs = imgs.to(self.device, non_blocking=True)
                if self.out_dtype != imgs.dtype:
                    imgs = imgs.to(self.out_dtype)
                yield imgs


def _named_errors(it, candidates):
    """Iterate a DALI iterator; a decode failure becomes a DataError naming the culprit files (`candidates()`: the
    files the reader may have been reading, most likely first)."""
    while True:
        try:
            out = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            raise _decode_error(e, candidates()) from None
        yield out


DECODE_SCAN_S = 60.0  # the time a failed run spends decoding candidates to name the bad file


def _decode_error(e: RuntimeError, files, budget_s: float = DECODE_SCAN_S) -> DataError:
    """DALI's decoder errors name no file (e.g. "nvImageCodec failure: '#3'"). Find the culprit among `files`
    (the ones this rank had not read yet this epoch first): a header check of all of them, then a full decode, in
    parallel, for at most `budget_s` seconds (a truncated JPEG has an intact header)."""
    from .check import check_file

    if files and isinstance(files[0], tuple):  # packed data: decode its members (a header check is the same)
        return _decode_error_members(e, files, budget_s)
    msg = str(e)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "failure" in ln.lower()), None) or next(
        (ln for ln in lines if "rror" in ln), lines[0] if lines else type(e).__name__)
    suspects, scanned = [], 0
    for f in files:
        finding = check_file(f, decode=False)
        if finding.bad:
            suspects.append(f"{f} ({finding.kind}: {finding.detail})")
    if not suspects:  # headers fine: decode the candidates in full, within the budget
        scanned = _decode_scan(files, suspects, budget_s)
    named = ("; the file(s) that cannot be decoded: " + ", ".join(suspects[:5])
             + (f" and {len(suspects) - 5} more" if len(suspects) > 5 else "")) if suspects else (
        f"; no header was bad and {scanned} of {len(files)} candidate file(s) decoded fine within {budget_s:.0f} s")
    return DataError(f"DALI could not decode an image ({detail[:200]}){named}. Run `mae data check DIR`: it writes "
                     "a quarantine list that both backends then skip. Checkpoints already written are intact; "
                     "resume with --resume.")


def _check_member(item) -> str | None:
    """Decode one packed sample (path, offset, size, name) in full; its problem, or None."""
    import io

    from PIL import Image

    path, off, size, name = item
    try:
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
        if len(data) != size:
            return f"{name} (truncated shard: {len(data)} of {size} bytes)"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return None


def _decode_error_members(e, members, budget_s: float) -> DataError:
    import time

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "failure" in ln.lower()), lines[0] if lines else type(e).__name__)
    t_end, suspects, scanned = time.monotonic() + budget_s, [], 0
    for item in members:
        bad = _check_member(item)
        scanned += 1
        if bad:
            suspects.append(bad)
            break
        if time.monotonic() > t_end:
            break
    named = f"; the sample that cannot be decoded: {suspects[0]}" if suspects else (
        f"; {scanned} of {len(members)} packed samples decoded fine within {budget_s:.0f} s")
    return DataError(f"DALI could not decode an image ({detail[:200]}){named}. Pack again without it (`mae data "
                     "pack` leaves out what `mae data check` flags). Checkpoints already written are intact; resume "
                     "with --resume.")


def _decode_scan(files, suspects: list, budget_s: float) -> int:
    """Fully decode `files` in parallel, in order, adding the bad ones to `suspects`, until done or `budget_s`
    is spent; returns how many were checked."""
    import os
    import time
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    from .check import MAX_PIXELS, _check_many

    t_end = time.monotonic() + budget_s
    chunks = deque(files[i:i + 64] for i in range(0, len(files), 64))
    workers = max(1, min(8, os.cpu_count() or 1))
    scanned, running = 0, deque()
    ex = ProcessPoolExecutor(workers)
    try:
        while chunks or running:
            while chunks and len(running) < 2 * workers and time.monotonic() < t_end:
                running.append(ex.submit(_check_many, (chunks.popleft(), MAX_PIXELS, True)))
            if not running:
                break
            findings = running.popleft().result()
            scanned += len(findings)
            suspects += [f"{x.path} ({x.kind}: {x.detail})" for x in findings if x.bad]
            if suspects or time.monotonic() > t_end:
                break
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    return scanned


def crop_sizes(files, scale, ratio, n_batches: int, batch_size: int = 16, seed: int = 0, device=None,
               hw_decoder_load: float = 0.65) -> list[tuple[int, int]]:
    """(h, w) of DALI's random crops of `files` (decoded, not resized): for comparing the crop distribution
    of this backend with the torchvision one, and of the GPU (`mixed`) decoder with the CPU one. `device`: None
    for the CPU decoder, a CUDA device for nvJPEG."""
    fn, pipeline_def, types, _, _ = _dali()
    gpu = device is not None and torch.device(device).type == "cuda"

    @pipeline_def
    def crops():
        encoded, _ = fn.readers.file(files=list(files), random_shuffle=True, seed=seed, name="Reader")
        return random_crop_decode(fn, types, encoded, scale, ratio, "mixed" if gpu else "cpu", hw_decoder_load)

    pipe = crops(batch_size=batch_size, num_threads=2, device_id=(torch.device(device).index or 0) if gpu else None,
                 seed=seed + 1)
    pipe.build()
    out = []
    for _ in range(n_batches):
        (batch,) = pipe.run()
        out += [tuple(s[:2]) for s in batch.shape()]
    return out
