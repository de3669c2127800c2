"""Reconstruction grids as in the paper's figures: original | masked | reconstruction | reconstruction with
the visible patches pasted back. Norm-pix predictions are un-normalised with each patch's own mean and
variance (the target's statistics), then the image normalisation is undone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kernels.loss import patchify, unpatchify


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                eps: float = 1e-6):
    """imgs [N, C, H, W] normalised -> (masked, recon, pasted), each [N, C, H, W] in normalised space,
    and the pixel mask [N, 1, H, W] (1 = removed)."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio, noise)
    finally:
        model.train(was_training)
    p = model.patch_size
    pred = pred.float()
    if model.norm_pix_loss:
        target = patchify(imgs.float(), p)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + eps) ** 0.5 + mean
    recon = unpatchify(pred, p, model.in_chans)
    pix_mask = unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * model.in_chans), p, model.in_chans)
    pasted = imgs.float() * (1 - pix_mask) + recon * pix_mask
    return pix_mask, recon, pasted


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """[C, H, W] normalised (any float dtype: loaders may deliver bf16) -> [H, W, 3] uint8."""
    x = x.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x[:3].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def reconstruction_grid(model, imgs: torch.Tensor, mean, std, mask_ratio: float | None = None,
                        noise: torch.Tensor | None = None, scale: int = 1) -> Image.Image:
    """One row per image: original | masked (grey at removed patches) | reconstruction | visible pasted."""
    pix_mask, recon, pasted = reconstruct(model, imgs, mask_ratio, noise)
    rows = []
    for i in range(imgs.shape[0]):
        orig = _to_uint8(imgs[i].float(), mean, std)
        masked = orig.copy()
        masked[pix_mask[i, 0].bool().cpu().numpy()] = 128
        cells = [orig, masked, _to_uint8(recon[i], mean, std), _to_uint8(pasted[i], mean, std)]
        h = orig.shape[0]
        sep = np.full((h, 2, 3), 255, np.uint8)
        row = np.concatenate([c for cell in cells for c in (cell, sep)][:-1], axis=1)
        rows.append(row)
        rows.append(np.full((2, row.shape[1], 3), 255, np.uint8))
    img = Image.fromarray(np.concatenate(rows[:-1], axis=0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temp file + rename)."""
    from .checkpoint import atomic_write

    return atomic_write(path, lambda f: img.save(f, format="PNG"))
