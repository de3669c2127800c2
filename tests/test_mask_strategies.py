import pytest
import torch

from kernels.masking import random_masking_torch
from kernels.noise import block_mask, make_noise


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_each_strategy_gives_exact_keep_count(strategy, ratio):
    g = torch.Generator().manual_seed(1)
    noise = make_noise(strategy, 5, 14, ratio, g)
    _, mask, _, _ = random_masking_torch(torch.zeros(5, 196, 1), ratio, noise)
    assert torch.equal(mask.sum(1), torch.full((5,), 196.0 - int(196 * (1 - ratio))))


def test_grid_keeps_one_of_every_four():
    g = torch.Generator().manual_seed(0)
    noise = make_noise("grid", 3, 14, 0.75, g)
    _, mask, _, _ = random_masking_torch(torch.zeros(3, 196, 1), 0.75, noise)
    for m in mask.view(3, 14, 14):
        kept = (m == 0).nonzero()
        assert len(kept) == 49
        assert len({(int(h) % 2, int(w) % 2) for h, w in kept}) == 1  # one lattice
        assert len({int(h) for h, _ in kept}) == 7 and len({int(w) for _, w in kept}) == 7


def test_block_masks_are_contiguous_blocks():
    g = torch.Generator().manual_seed(0)
    m = block_mask(14, 98, g)
    assert 98 <= int(m.sum()) <= 98 + 4
    # blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour
    mm = m.float()
    nb = torch.zeros_like(mm)
    nb[1:] += mm[:-1]
    nb[:-1] += mm[1:]
    nb[:, 1:] += mm[:, :-1]
    nb[:, :-1] += mm[:, 1:]
    assert ((nb > 0) & m).sum() >= 0.95 * m.sum()


def test_random_is_plain_uniform_noise():
    a = make_noise("random", 2, 8, 0.75, torch.Generator().manual_seed(3))
    b = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_strategy():
    with pytest.raises(ValueError, match="mask strategy must be one of"):
        make_noise("checker", 1, 4, 0.5)


def test_training_with_each_strategy(tmp_path):
    from conftest import debug_cfg
    from engine.trainer import Trainer

    for s in ("block", "grid"):
        res = Trainer(debug_cfg(tmp_path / s, **{"model.mask_strategy": s, "train.max_steps": 3})).fit()
        assert res.step == 3 and res.last_loss == res.last_loss


@pytest.mark.parametrize("strategy", ["grid", "random"])
def test_the_trainer_masks_with_the_configured_strategy(tmp_path, strategy):
    """--model.mask_strategy reaches the masks training uses: with grid every image keeps one patch of each 2x2
    cell on one lattice; with random (the control: the check can fail) almost no image does."""
    from conftest import debug_cfg
    from engine.trainer import Trainer

    t = Trainer(debug_cfg(tmp_path, **{"model.mask_strategy": strategy, "train.max_steps": 2}))
    masks = []
    real = t.model.forward

    def spy(imgs, mask_ratio=None, noise=None):
        out = real(imgs, mask_ratio, noise)
        masks.append(out[2].detach())
        return out

    t.model.forward = spy
    t.fit()
    g = t.cfg.model.grid_size
    on_lattice = 0
    for m in torch.cat(masks).view(-1, g, g):
        kept = (m == 0).nonzero().tolist()
        on_lattice += len({(h % 2, w % 2) for h, w in kept}) == 1
    n = sum(len(m) for m in masks)
    if strategy == "grid":
        assert on_lattice == n >= 2 * t.cfg.train.batch_size  # the reconstruction grids use the strategy too
    else:
        assert on_lattice < 0.05 * n
