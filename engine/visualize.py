"""Reconstruction grids, a held-out score and the loss curve of a run.

A grid has one row per image and the labelled columns of COLUMNS:
  original | masked input | untrained | trained | error, untrained | error, trained
"untrained" is the run's own initial weights (the same seed, `initial_model`), "trained" the weights now. In both,
the visible patches are the input as given and each removed patch is what the model predicted and nothing else:
under the norm-pix loss the model predicts a patch's pixels up to its mean and contrast, so those are taken from
the visible patches around it (`neighbour_stats`: the 3x3 neighbourhood of the patch grid, else 5x5, else the
whole image's visible patches), never from the removed patch itself. The error columns map each removed patch's
mean squared error in the loss's units (per-patch normalised under norm-pix) from black (0) through red and yellow
to white (2 or more), over the visible patches dimmed; the number in their corner is the image's masked-patch error,
the loss on that image (1.0 is what predicting each patch's mean scores). Learning shows as the untrained column's
flat or noisy patches becoming shapes that continue the visible ones, the error maps darkening and the numbers
falling. Greyscale inputs are shown in grey throughout (the channels' mean).

(The paper's figures un-normalise each removed patch with its own true mean and variance: much of what such a
picture shows comes from the answer, so these grids do not.)

`masked_patch_error` is the norm-pix loss on removed patches of given images under fixed masks; `write_loss_curve`
plots metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from kernels.loss import patchify, unpatchify

from .model import evaluating

COLUMNS = ("original", "masked input", "untrained", "trained", "error, untrained", "error, trained")
FOOTNOTE = ("untrained / trained: removed patches are the prediction alone, with the mean and contrast of the visible "
            "patches around them",
            "error: each removed patch's mean squared error (black 0, white >= 2); corner: the image's masked-patch "
            "error (1.0 = each patch's mean)")
ERROR_WHITE = 2.0
"""Squared error (loss units) shown as white in the error columns."""


def initial_model(cfg, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The untrained model of a run: its architecture built after seeding with the run's seed, which gives a
    one-process run's own initial weights (tests/test_visualize.py holds them equal)."""
    from .model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
    return model.to(device)


@dataclass
class Prediction:
    """What a grid shows of one model on a batch: removed [N, H, W] bool (1 = removed), image [N, C, H, W] in the
    input's normalisation (visible patches as given, removed ones predicted), error [N, H, W] (each removed
    patch's mean squared error in loss units over its pixels, 0 elsewhere), per_image [N] (the masked-patch error
    of each image: the mean of its removed patches' errors)."""

    removed: torch.Tensor
    image: torch.Tensor
    error: torch.Tensor
    per_image: torch.Tensor


def neighbour_stats(mean: torch.Tensor, var: torch.Tensor, visible: torch.Tensor, grid: int):
    """Per patch, the mean and variance of the pixels of the visible patches around it: mean, var, visible
    [N, L] -> (mean, var) [N, L], from the 3x3 neighbourhood of the patch grid where it has a visible patch, else
    the 5x5 one, else all visible patches of the image. Only visible patches contribute."""
    n = mean.shape[0]
    second = var + mean * mean  # each patch's mean square, so the pooled variance counts between-patch spread

    def pooled(k):
        stack = torch.stack([visible, mean * visible, second * visible], dim=1).view(n * 3, 1, grid, grid)
        out = F.conv2d(stack, torch.ones(1, 1, k, k, dtype=stack.dtype, device=stack.device), padding=k // 2)
        return out.view(n, 3, grid * grid).unbind(1)

    count, s_mean, s_second = pooled(3)
    for k in (5, None):
        if k is None:
            c, m1, m2 = (x.sum(dim=1, keepdim=True).expand_as(count)
                         for x in (visible, mean * visible, second * visible))
        else:
            c, m1, m2 = pooled(k)
        empty = count == 0
        count, s_mean, s_second = (torch.where(empty, c, count), torch.where(empty, m1, s_mean),
                                   torch.where(empty, m2, s_second))
    count = count.clamp_min(1)  # no visible patch at all (a mask ratio of 1 is refused before): zero statistics
    m = s_mean / count
    return m, (s_second / count - m * m).clamp_min(0)


@torch.no_grad()
def predict(model, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
            eps: float = 1e-6) -> Prediction:
    """The model's prediction of the removed patches of imgs [N, C, H, W] (normalised), in pixels, with no
    statistic of the removed patches used (see the module's docstring)."""
    with evaluating(model):
        _, pred, mask = model(imgs, mask_ratio, noise)
    p, c = model.patch_size, model.in_chans
    pred, mask = pred.float(), mask.float()
    target = patchify(imgs.float(), p)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    if model.norm_pix_loss:  # the prediction is per-patch normalised: its mean and contrast come from the neighbours
        goal = (target - mean) / (var + eps) ** 0.5
        n_mean, n_var = neighbour_stats(mean[..., 0], var[..., 0], 1 - mask, int(round(mask.shape[1] ** 0.5)))
        pixels = pred * (n_var.unsqueeze(-1) + eps) ** 0.5 + n_mean.unsqueeze(-1)
    else:
        goal, pixels = target, pred
    sq = (pred - goal) ** 2  # the loss's units
    per_image = (sq.mean(dim=-1) * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    keep = 1 - mask.unsqueeze(-1)
    image = unpatchify(target * keep + pixels * (1 - keep), p, c)
    patch_error = sq.mean(dim=-1, keepdim=True) * mask.unsqueeze(-1)  # per patch: what the loss averages
    error = unpatchify(patch_error.expand(-1, -1, p * p * c), p, c)[:, 0]
    removed = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * c), p, c)[:, 0].bool()
    return Prediction(removed, image, error, per_image)


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """[C, H, W] normalised (any float dtype: loaders may deliver bf16) -> [H, W, 3] uint8."""
    x = x.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x[:3].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.repeat((rgb.astype(np.float32).mean(axis=-1, keepdims=True) + 0.5).astype(np.uint8), 3, axis=-1)


def _error_uint8(err: torch.Tensor, removed: np.ndarray, orig: np.ndarray) -> np.ndarray:
    """[H, W] error -> [H, W, 3]: black (0) -> red -> yellow -> white (ERROR_WHITE) on removed pixels; the
    visible ones as the original, greyed and dimmed."""
    x = (err.float().cpu().numpy() / ERROR_WHITE).clip(0, 1)
    ramp = np.stack([(3 * x).clip(0, 1), (3 * x - 1).clip(0, 1), (3 * x - 2).clip(0, 1)], axis=-1)
    out = (ramp * 255 + 0.5).astype(np.uint8)
    dim = (_grey(orig).astype(np.float32) * 0.3 + 0.5).astype(np.uint8)
    out[~removed] = dim[~removed]
    return out


def _label_row(widths: list[int], height: int, sep: int, names) -> np.ndarray:
    img = Image.new("RGB", (sum(widths) + sep * (len(widths) - 1), height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x = 0
    for w, text in zip(widths, names):
        d.text((x + 2, 2), text, fill=(0, 0, 0))
        x += w + sep
    return np.asarray(img)


def _corner(cell: np.ndarray, text: str) -> np.ndarray:
    img = Image.fromarray(cell)
    d = ImageDraw.Draw(img)
    box = d.textbbox((1, 1), text)
    d.rectangle((0, 0, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
    d.text((1, 1), text, fill=(255, 255, 255))
    return np.asarray(img)


def reconstruction_grid(model, imgs: torch.Tensor, mean, std, mask_ratio: float | None = None,
                        noise: torch.Tensor | None = None, scale: int = 1, labels: bool = True,
                        untrained=None) -> Image.Image:
    """One row per image, the columns of COLUMNS (labels=True adds their names on top and the footnote below).

    untrained: the untrained model (`initial_model`) or its `predict` on the same images and noise (a run computes
    it once); None leaves out the two untrained columns."""
    now = predict(model, imgs, mask_ratio, noise)
    before = untrained if isinstance(untrained, Prediction) or untrained is None else predict(
        untrained, imgs, mask_ratio, noise)
    names = COLUMNS if before is not None else tuple(c for c in COLUMNS if "untrained" not in c)
    rows = []
    for i in range(imgs.shape[0]):
        orig = _to_uint8(imgs[i].float(), mean, std)
        grey = bool((orig == orig[..., :1]).all())
        removed = now.removed[i].cpu().numpy()
        masked = orig.copy()
        masked[removed] = 128
        shown = lambda x: _grey(x) if grey else x  # noqa: E731 - greyscale inputs stay grey
        cells = [orig, masked]
        if before is not None:
            cells.append(shown(_to_uint8(before.image[i], mean, std)))
        cells.append(shown(_to_uint8(now.image[i], mean, std)))
        errors = ([before] if before is not None else []) + [now]
        cells += [(_error_uint8(e.error[i], removed, orig), f"{float(e.per_image[i]):.2f}") for e in errors]
        rows.append(cells)
    h, w = rows[0][0].shape[:2]
    big = lambda c: np.asarray(Image.fromarray(c).resize((w * scale, h * scale), Image.NEAREST))  # noqa: E731
    rows = [[_corner(big(c[0]), c[1]) if isinstance(c, tuple) else big(c) for c in r] for r in rows]
    h, w = h * scale, w * scale
    sep = 2
    lines = []
    for cells in rows:
        gap = np.full((h, sep, 3), 255, np.uint8)
        lines.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1))
        lines.append(np.full((sep, lines[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(lines[:-1], axis=0)
    if labels:
        head = _label_row([w] * len(names), 14, sep, names)
        foot = Image.new("RGB", (grid.shape[1], 14 * len(FOOTNOTE)), (255, 255, 255))
        for k, text in enumerate(FOOTNOTE):
            ImageDraw.Draw(foot).text((2, 2 + 14 * k), text, fill=(80, 80, 80))
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
    with evaluating(model):
        loss, _, _ = model(imgs, mask_ratio, noise)
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
