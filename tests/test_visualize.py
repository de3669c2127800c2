"""The reconstruction grids show what the model predicted and nothing of the answer (issue 29: the pictures show
learning): the removed patches' own pixels never reach the predicted columns, the statistics borrowed from the
visible neighbours are the ones named, greyscale stays grey, the untrained column is the run's own initial model,
and the README, `mae visualize` and the picture name the same columns."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import debug_cfg
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cli import VISUALIZE_DESCRIPTION
from engine.config import apply_overrides, debug
from engine.model import build_model
from engine.trainer import Trainer
from engine.visualize import COLUMNS, initial_model, neighbour_stats, predict, reconstruction_grid
from kernels.loss import patchify, unpatchify

ROOT = Path(__file__).resolve().parents[1]


def _model(norm_pix=True):
    torch.manual_seed(0)
    cfg = apply_overrides(debug(), {"model.norm_pix_loss": "true" if norm_pix else "false"})
    model = build_model(cfg.model).eval()
    model.img_size = cfg.model.img_size
    return model, cfg


def _batch(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, model.img_size, model.img_size, generator=g)
    noise = torch.rand(n, model.num_patches, generator=g)
    return imgs, noise


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_predicted_patches_use_nothing_of_the_removed_pixels(norm_pix):
    """Replace every removed patch's pixels with other values: the picture of the prediction does not change
    (the model sees only visible patches, and the un-normalisation reads only visible ones), the error does."""
    model, _ = _model(norm_pix)
    imgs, noise = _batch(model)
    a = predict(model, imgs, 0.75, noise)
    p = model.patch_size
    removed = a.removed.unsqueeze(1)
    other = torch.where(removed, torch.randn_like(imgs) * 3 + 1, imgs)
    b = predict(model, other, 0.75, noise)
    assert torch.equal(a.removed, b.removed)
    assert torch.allclose(a.image, b.image, atol=1e-5)
    assert not torch.allclose(a.per_image, b.per_image)
    assert torch.equal(a.image[~removed.expand_as(imgs)], imgs[~removed.expand_as(imgs)])  # visible: as given
    assert patchify(a.error.unsqueeze(1), p).shape[1] == model.num_patches


def _brute_stats(mean, var, visible, g):
    n, length = mean.shape
    out_m, out_v = torch.zeros(n, length), torch.zeros(n, length)
    for i in range(n):
        for k in range(length):
            r, c = divmod(k, g)
            chosen = None
            for half in (1, 2):
                near = [j for j in range(length) if visible[i, j] and abs(j // g - r) <= half and abs(j % g - c) <= half]
                if near:
                    chosen = near
                    break
            chosen = chosen or [j for j in range(length) if visible[i, j]]
            m = sum(float(mean[i, j]) for j in chosen) / len(chosen)
            s2 = sum(float(var[i, j] + mean[i, j] ** 2) for j in chosen) / len(chosen)
            out_m[i, k], out_v[i, k] = m, max(s2 - m * m, 0.0)
    return out_m, out_v


@settings(max_examples=30, deadline=None)
@given(g=st.integers(1, 7), seed=st.integers(0, 2**31 - 1), keep=st.floats(0.02, 1.0))
def test_neighbour_statistics_are_the_visible_neighbourhood_or_the_image(g, seed, keep):
    gen = torch.Generator().manual_seed(seed)
    n, length = 2, g * g
    mean = torch.randn(n, length, generator=gen, dtype=torch.float64)
    var = torch.rand(n, length, generator=gen, dtype=torch.float64)
    visible = (torch.rand(n, length, generator=gen) < keep).double()
    visible[:, torch.randint(length, (1,), generator=gen)] = 1.0  # at least one visible patch (as masking keeps)
    m, v = neighbour_stats(mean, var, visible, g)
    bm, bv = _brute_stats(mean, var, visible, g)
    assert torch.allclose(m.float(), bm, atol=1e-5) and torch.allclose(v.float(), bv, atol=1e-5)


def test_greyscale_images_stay_grey_in_every_column():
    model, cfg = _model()
    imgs, noise = _batch(model, n=2)
    mean, std = cfg.data.mean, cfg.data.std
    grey_pixels = torch.rand(2, 1, model.img_size, model.img_size).expand(-1, 3, -1, -1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    grey = (grey_pixels - m) / s  # grey photographs, normalised as the loader does
    grid = np.asarray(reconstruction_grid(model, grey, mean, std, 0.75, noise, labels=False,
                                          untrained=initial_model(cfg)))
    w = model.img_size
    cells = grid[:w, : 4 * (w + 2) - 2]  # the first row's picture columns (the error maps are coloured)
    assert (cells[..., 0] == cells[..., 1]).all() and (cells[..., 1] == cells[..., 2]).all()
    colour = np.asarray(reconstruction_grid(model, imgs, mean, std, 0.75, noise, labels=False))
    assert not (colour[..., 0] == colour[..., 1]).all()


def test_a_grid_has_the_columns_the_readme_and_the_command_name():
    model, cfg = _model()
    imgs, noise = _batch(model, n=2)
    grid = reconstruction_grid(model, imgs, cfg.data.mean, cfg.data.std, 0.75, noise, labels=False,
                               untrained=initial_model(cfg))
    w = model.img_size
    assert grid.width == len(COLUMNS) * (w + 2) - 2 and grid.height == 2 * (w + 2) - 2
    shown = " | ".join(COLUMNS)
    assert shown in VISUALIZE_DESCRIPTION
    assert shown in " ".join((ROOT / "README.md").read_text().split())


def test_the_untrained_column_is_the_runs_own_initial_model(tmp_path):
    cfg = debug_cfg(tmp_path, **{"train.max_steps": 1})
    tr = Trainer(cfg, log=lambda m: None)
    start = initial_model(cfg)
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, start.state_dict()[k]), k


def test_the_untrained_predictions_are_rebuilt_when_the_images_change(tmp_path, monkeypatch):
    """Cached for the same images, rebuilt for others, even when they sit in the same memory."""
    import engine.visualize as vis

    tr = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 1}), log=lambda m: None)
    built = []
    real = vis.initial_model
    monkeypatch.setattr(vis, "initial_model", lambda *a, **k: built.append(1) or real(*a, **k))

    def noise_for(n):
        return torch.rand(n, tr.cfg.model.num_patches, generator=torch.Generator().manual_seed(0))

    imgs = torch.randn(2, 3, 32, 32)
    first = tr._untrained_predictions(imgs, None, noise_for)["train"]
    tr._untrained_predictions(imgs.clone(), None, noise_for)
    assert len(built) == 1  # the same content: cached
    imgs.mul_(-1)  # new images in the same memory
    again = tr._untrained_predictions(imgs, None, noise_for)["train"]
    assert len(built) == 2 and not torch.equal(first.image, again.image)


def test_a_run_shows_its_untrained_error_beside_the_trained_one(tmp_path):
    import json

    lines = []
    Trainer(debug_cfg(tmp_path, **{"train.max_steps": 30, "train.vis_every": 30}), log=lines.append).fit()
    held = json.loads((tmp_path / "recon" / "heldout.json").read_text())
    assert held["untrained"] > held["heldout_error"] + 0.3  # the untrained model, same masks: far worse
    assert any(f"untrained {held['untrained']:.3f}" in x for x in lines)


def test_unpatchify_of_the_error_is_constant_per_patch():
    model, _ = _model()
    imgs, noise = _batch(model, n=1)
    err = predict(model, imgs, 0.75, noise).error  # [1, H, W]
    per_patch = patchify(err.unsqueeze(1), model.patch_size)
    assert torch.equal(per_patch, per_patch[..., :1].expand_as(per_patch))
    assert torch.equal(unpatchify(per_patch, model.patch_size, 1)[:, 0], err)
