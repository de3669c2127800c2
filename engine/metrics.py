"""Throughput, FLOPs/MFU, memory (torch allocator and pynvml), and the JSONL / TensorBoard writer."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), by substring of the device name.
DATASHEET_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def block_macs(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-accumulates of one ViT block on `tokens` tokens: T*d*d*(4 + 2*mlp_ratio) + 2*T*T*d.

    qkv (3 d^2) + proj (d^2) + MLP (2 * mlp_ratio * d^2) per token, plus QK^T and AV (2 T^2 d).
    """
    return int(tokens * width * width * (4 + 2 * mlp_ratio) + 2 * tokens * tokens * width)


def mae_forward_macs(m, mask_ratio: float | None = None, encoder_all: bool | None = None) -> int:
    """Forward MACs per image of an MAE with ModelConfig `m`.

    Encoder on len_keep + 1 tokens (all L + 1 with encoder_all, the dense baseline), decoder on L + 1;
    plus patch embedding (all patches), decoder embedding and the pixel head (on the L patch rows).
    """
    r = m.mask_ratio if mask_ratio is None else mask_ratio
    encoder_all = m.encoder_mask_tokens if encoder_all is None else encoder_all
    length = m.num_patches
    patch_dim = m.patch_size**2 * m.in_chans
    t_enc = (length if encoder_all else int(length * (1 - r))) + 1
    t_dec = length + 1
    macs = m.depth * block_macs(t_enc, m.embed_dim, m.mlp_ratio)
    macs += m.decoder_depth * block_macs(t_dec, m.decoder_embed_dim, m.mlp_ratio)
    macs += length * patch_dim * m.embed_dim  # patch embedding
    macs += t_enc * m.embed_dim * m.decoder_embed_dim  # decoder_embed
    macs += length * m.decoder_embed_dim * patch_dim  # decoder_pred (the patch rows only: no cls row)
    return macs


def train_flops_per_image(m, mask_ratio: float | None = None, encoder_all: bool | None = None) -> float:
    """Training FLOPs per image = 6 x forward MACs (2 FLOPs per MAC; backward = 2 x forward)."""
    return 6.0 * mae_forward_macs(m, mask_ratio, encoder_all)


def vit_train_flops_per_image(m, num_classes: int = 1000) -> float:
    """Training FLOPs per image of the dense supervised ViT with the same encoder (timm's VisionTransformer)."""
    length = m.num_patches
    macs = m.depth * block_macs(length + 1, m.embed_dim, m.mlp_ratio)
    macs += length * m.patch_size**2 * m.in_chans * m.embed_dim + m.embed_dim * num_classes
    return 6.0 * macs


def datasheet_peak(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the CUDA device from its datasheet, None when unknown or not CUDA."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DATASHEET_BF16_PEAK.items():
        if key in name:
            return peak
    return None


def mfu(flops_per_image: float, images_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak; None without a peak."""
    if not peak_flops:
        return None
    return flops_per_image * images_per_s / peak_flops


def device_memory_used(device_index: int = 0) -> int | None:
    """Bytes in use on the GPU as the driver sees it (pynvml), None when unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None


def peak_allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class MetricsWriter:
    """Append-only metrics.jsonl (flushed per record) plus optional TensorBoard events, in the run directory.

    resume_step: the step a resumed run starts from; records of later steps (written by the run before it was
    interrupted, and now to be trained again) are moved to metrics.superseded.jsonl, marked with the step of the
    resume, so metrics.jsonl holds one record per step. A write that fails (full disk) is one CheckpointError
    naming the file."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step and self.path.is_file():
                self._supersede(resume_step)
            self._f = open(self.path, "a", buffering=1)
        except OSError as e:
            from .checkpoint import io_error

            raise io_error(e, self.path.name, self.path.parent) from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception as e:  # tensorboard missing or broken: keep JSONL, say so once
                print(f"warning: TensorBoard logging disabled ({type(e).__name__}: {e})", file=sys.stderr)

    def _supersede(self, resume_step: int) -> None:
        from .checkpoint import atomic_write

        keep, moved = [], []
        for line in self.path.read_text().splitlines():
            try:
                step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a line cut by a kill: not a record
                continue
            (moved if step > resume_step else keep).append(line)
        if not moved:
            return
        with open(self.path.with_name("metrics.superseded.jsonl"), "a") as f:
            for line in moved:
                rec = json.loads(line)
                rec["superseded_by_resume_at"] = resume_step
                f.write(json.dumps(rec) + "\n")
        atomic_write(self.path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: v for k, v in values.items() if v is not None})
        try:
            self._f.write(json.dumps(rec) + "\n")
        except OSError as e:
            from .checkpoint import io_error

            raise io_error(e, self.path.name, self.path.parent) from None
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def image(self, tag: str, step: int, img) -> None:
        """A PIL image to TensorBoard (the reconstruction grids), when TensorBoard is on."""
        if not self.enabled or self.tb is None:
            return
        import numpy as np

        self.tb.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
