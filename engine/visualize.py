"""Reconstruction grids, a held-out score and the loss curve of a run.

A grid has one row per image and labelled columns:
  original | masked (the input) | prediction, normalised | target, normalised | reconstruction | + visible
"prediction, normalised" is what the model outputs for each removed patch under the norm-pix loss (per-patch
zero mean, unit variance), shown on the same scale as "target, normalised", the per-patch normalised pixels it is
trained to predict: this pair shows what the model learned and leaks nothing of the answer. "reconstruction" is the
paper's figure convention: the prediction un-normalised with each removed patch's own true mean and variance, so
its colours and contrast come from the answer, not from the model. Visible patches appear as they are in every
column after "masked".

`masked_patch_error` is the norm-pix loss on removed patches of given images (1.0 is what predicting each patch's
mean scores); `write_loss_curve` plots metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from kernels.loss import patchify, unpatchify

COLUMNS = ("original", "masked", "prediction, normalised", "target, normalised", "reconstruction*", "+ visible")
FOOTNOTE = "* un-normalised with each removed patch's true mean and std (the paper's figures)"


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                eps: float = 1e-6):
    """imgs [N, C, H, W] normalised -> (pixel mask [N, 1 or C, H, W] (1 = removed), reconstruction, visible pasted,
    prediction in normalised-patch space, target in normalised-patch space), image tensors [N, C, H, W]."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio, noise)
    finally:
        model.train(was_training)
    p = model.patch_size
    pred = pred.float()
    target = patchify(imgs.float(), p)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    norm_target = (target - mean) / (var + eps) ** 0.5
    if model.norm_pix_loss:
        norm_pred = pred
        pred = pred * (var + eps) ** 0.5 + mean
    else:
        norm_pred = (pred - pred.mean(dim=-1, keepdim=True)) / (pred.var(dim=-1, keepdim=True) + eps) ** 0.5
    c = model.in_chans
    recon = unpatchify(pred, p, c)
    pix_mask = unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * c), p, c)
    pasted = imgs.float() * (1 - pix_mask) + recon * pix_mask
    return pix_mask, recon, pasted, unpatchify(norm_pred, p, c), unpatchify(norm_target, p, c)


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """[C, H, W] normalised (any float dtype: loaders may deliver bf16) -> [H, W, 3] uint8."""
    x = x.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x[:3].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _normalised_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in per-patch normalised units -> uint8, +-2 std mapped to the full range."""
    x = (x.float() * 0.25 + 0.5).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x[:3].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _label_row(widths: list[int], height: int, sep: int) -> np.ndarray:
    img = Image.new("RGB", (sum(widths) + sep * (len(widths) - 1), height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x = 0
    for w, text in zip(widths, COLUMNS):
        d.text((x + 2, 2), text, fill=(0, 0, 0))
        x += w + sep
    return np.asarray(img)


def reconstruction_grid(model, imgs: torch.Tensor, mean, std, mask_ratio: float | None = None,
                        noise: torch.Tensor | None = None, scale: int = 1, labels: bool = True) -> Image.Image:
    """One row per image, the columns of COLUMNS; labels=True adds their names on top and the footnote below."""
    pix_mask, recon, pasted, npred, ntarget = reconstruct(model, imgs, mask_ratio, noise)
    rows = []
    for i in range(imgs.shape[0]):
        orig = _to_uint8(imgs[i].float(), mean, std)
        removed = pix_mask[i, 0].bool().cpu().numpy()
        masked = orig.copy()
        masked[removed] = 128
        pred_n, target_n = _normalised_uint8(npred[i]), _normalised_uint8(ntarget[i])
        pred_n[~removed] = orig[~removed]  # visible patches as they are: the model saw them
        target_n[~removed] = orig[~removed]
        cells = [orig, masked, pred_n, target_n, _to_uint8(recon[i], mean, std), _to_uint8(pasted[i], mean, std)]
        rows.append(cells)
    h, w = rows[0][0].shape[:2]
    if scale > 1:
        rows = [[np.asarray(Image.fromarray(c).resize((w * scale, h * scale), Image.NEAREST)) for c in r]
                for r in rows]
        h, w = h * scale, w * scale
    sep = 2
    lines = []
    for cells in rows:
        gap = np.full((h, sep, 3), 255, np.uint8)
        lines.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1))
        lines.append(np.full((sep, lines[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(lines[:-1], axis=0)
    if labels:
        head = _label_row([w] * len(COLUMNS), 14, sep)
        foot = Image.new("RGB", (grid.shape[1], 14), (255, 255, 255))
        ImageDraw.Draw(foot).text((2, 2), FOOTNOTE, fill=(80, 80, 80))
        grid = np.concatenate([head, grid, np.asarray(foot)], axis=0)
    return Image.fromarray(grid)


@torch.no_grad()
def masked_patch_error(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 1234,
                       strategy: str = "random") -> float:
    """The norm-pix loss on the removed patches of `imgs` under fixed masks drawn with the run's mask strategy:
    1.0 is what predicting each patch's mean scores (the target has zero mean and unit variance per patch), lower
    is learned structure."""
    from kernels.noise import make_noise

    g = torch.Generator(device=imgs.device).manual_seed(seed)
    grid = int(round(model.num_patches ** 0.5))
    noise = make_noise(strategy, imgs.shape[0], grid, mask_ratio, g, imgs.device)
    was = model.training
    model.eval()
    try:
        loss, _, _ = model(imgs, mask_ratio, noise)
    finally:
        model.train(was)
    return float(loss)


def write_loss_curve(metrics: list[dict], path: str | Path, title: str = "") -> Path | None:
    """loss (and kNN top-1 when logged) against step, as a PNG written atomically; None without records."""
    pts = [(r["step"], r["loss"]) for r in metrics if "loss" in r and r["loss"] == r["loss"]]
    if not pts:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label="training loss (norm-pix MSE)")
    held = [(r["step"], r["heldout_error"]) for r in metrics if "heldout_error" in r]
    if held:
        ax.plot([p[0] for p in held], [p[1] for p in held], "o-", label="held-out masked-patch error")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="predicting each patch's mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from .checkpoint import atomic_write

    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_grid(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temp file + rename)."""
    from .checkpoint import atomic_write

    return atomic_write(path, lambda f: img.save(f, format="PNG"))
