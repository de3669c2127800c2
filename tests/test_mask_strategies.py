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


# Properties over any grid, ratio and seed (issue 28: one property kills a class of planted bugs at once)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels.noise import block_noise, grid_noise  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(grid=st.integers(4, 16), ratio=st.floats(0.3, 0.9), seed=st.integers(0, 2**31 - 1))
def test_block_masks_cover_what_was_asked_with_at_most_one_block_of_overshoot(grid, ratio, seed):
    num_masked = grid * grid - int(grid * grid * (1 - ratio))
    m = block_mask(grid, num_masked, torch.Generator().manual_seed(seed))
    assert m.dtype == torch.bool and m.shape == (grid, grid)
    assert num_masked <= int(m.sum()) <= num_masked + 4  # BEiT's overshoot: at most min_block
    noise = block_noise(3, grid, ratio, torch.Generator().manual_seed(seed))
    assert noise.shape == (3, grid * grid) and noise.dtype == torch.float32
    masked = noise >= 1  # masked blocks in [1, 2), the rest in [0, 1)
    assert bool((noise < 2).all() and (noise >= 0).all())
    assert all(num_masked <= int(k) <= num_masked + 4 for k in masked.sum(1))
    again = block_noise(3, grid, ratio, torch.Generator().manual_seed(seed))
    assert torch.equal(noise, again)  # a seed is one set of masks


@settings(max_examples=60, deadline=None)
@given(grid=st.integers(2, 16), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31 - 1))
def test_grid_noise_puts_a_regular_lattice_below_one(grid, ratio, seed):
    n = 3
    noise = grid_noise(n, grid, ratio, torch.Generator().manual_seed(seed))
    assert noise.shape == (n, grid * grid) and bool((noise >= 0).all() and (noise < 2).all())
    keep = max(1, int(grid * grid * (1 - ratio)))
    stride = max(1, int(round((grid * grid / keep) ** 0.5)))
    for row in (noise < 1).view(n, grid, grid):
        hs, ws = row.any(1).nonzero().flatten().tolist(), row.any(0).nonzero().flatten().tolist()
        assert hs and ws and hs[0] < stride and ws[0] < stride  # the offset is below the stride
        assert hs == list(range(hs[0], grid, stride)) and ws == list(range(ws[0], grid, stride))
        assert int(row.sum()) == len(hs) * len(ws)  # every crossing of a lattice row and column, nothing else


def test_noise_follows_its_generator():
    for s in ("random", "block", "grid"):
        a = make_noise(s, 2, 8, 0.75, torch.Generator().manual_seed(5))
        assert torch.equal(a, make_noise(s, 2, 8, 0.75, torch.Generator().manual_seed(5)))
        assert not torch.equal(a, make_noise(s, 2, 8, 0.75, torch.Generator().manual_seed(6)))


def test_block_noise_draws_from_the_given_cpu_generator_itself():
    """A CPU generator is used as it is (no reseeded copy): the noise is the block maps drawn from it in order,
    then uniform noise from it; without a generator the global stream serves."""
    grid, ratio, n = 8, 0.6, 3
    num_masked = grid * grid - int(grid * grid * (1 - ratio))
    got = block_noise(n, grid, ratio, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    maps = torch.stack([block_mask(grid, num_masked, g).flatten() for _ in range(n)]).float()
    assert torch.equal(got, maps + torch.rand(n, grid * grid, generator=g))
    torch.manual_seed(3)
    a = make_noise("block", n, grid, ratio)
    torch.manual_seed(3)
    assert torch.equal(a, make_noise("block", n, grid, ratio)) and a.shape == (n, grid * grid)


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_noise_lands_on_the_device_asked_for(strategy):
    """The step draws masks on the training device: `meta` stands in for a GPU here (no data, the same placement)."""
    noise = make_noise(strategy, 2, 4, 0.5, None, "meta")
    assert noise.device.type == "meta" and noise.shape == (2, 16)


def test_block_masks_prefer_no_side_and_no_direction():
    """BEiT's law has no preferred edge (a block's position is uniform over where it fits) and no preferred
    direction (the aspect ratio is log-uniform on [0.3, 1/0.3], symmetric under transposition). Over 3,000 maps:
    each row is masked as often as its mirror row, each column as its mirror, rows as columns, and horizontally
    adjacent masked pairs are as frequent as vertical ones. Measured here: at most 0.015, 0.008, 0.008 and 0.001;
    a placement range one too wide gives 0.15, an aspect law skewed to wide blocks 0.08."""
    g = torch.Generator().manual_seed(0)
    maps = torch.stack([block_mask(14, 98, g) for _ in range(3000)]).float()
    rows, cols = maps.mean((0, 2)), maps.mean((0, 1))
    assert float((rows - rows.flip(0)).abs().max()) < 0.05
    assert float((cols - cols.flip(0)).abs().max()) < 0.05
    assert float((rows - cols).abs().max()) < 0.05
    across = (maps[:, :, 1:] * maps[:, :, :-1]).sum()
    down = (maps[:, 1:, :] * maps[:, :-1, :]).sum()
    assert float((across - down).abs() / (across + down)) < 0.02


def test_an_impossible_block_target_stops_at_its_try_budget():
    g = torch.Generator().manual_seed(0)
    m = block_mask(4, 17, g, max_tries=50)  # 17 of 16 patches: it cannot be met
    assert bool(m.all())


def test_block_masks_stop_once_covered_and_overshoot_by_up_to_one_small_block():
    """The search stops as soon as the target is covered, so a map hits it exactly more often than it overshoots
    it by 1, 2, 3 or 4 patches (the last block may reach past, by at most min_block = 4). Measured: 37% exact, the
    counts falling with the overshoot, 1.5% at the full 4."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([int(block_mask(14, 98, g).sum()) for _ in range(1000)])
    hist = [int((counts == 98 + k).sum()) for k in range(5)]
    assert sum(hist) == 1000 and hist[0] >= 250, hist
    assert hist == sorted(hist, reverse=True) and hist[4] > 0, hist


def test_grid_noise_orders_each_sample_on_its_own():
    noise = grid_noise(4, 8, 0.75, torch.Generator().manual_seed(2))
    frac = noise % 1
    assert all(not torch.equal(frac[0], frac[i]) for i in range(1, 4))


def test_the_smallest_blocks_are_drawn_by_their_exact_law():
    """BEiT's law at its smallest: one patch asked for, min_block 1, so every try has area exactly 1 and aspect
    log-uniform on [0.3, 1/0.3]: a 1x1 block when the aspect is in (1/2.25, 2.25), else a 1x2 or 2x1 one (a side of
    sqrt(aspect) or sqrt(1/aspect) rounds to 2), which overshoots by one. A 1-patch grid takes exactly the 1x1 block;
    a 2x2 grid asked for all four patches takes one 2x2 block (no smaller block fits the budget)."""
    import math

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([int(block_mask(2, 1, g, min_block=1).sum()) for _ in range(4000)])
    assert set(counts.unique().tolist()) == {1, 2}
    law = (math.log(1 / 2.25 / 0.3) + math.log(1 / 0.3 / 2.25)) / math.log(1 / 0.3 / 0.3)  # about 0.33
    assert abs(float((counts == 2).float().mean()) - law) < 0.03  # 4 standard errors
    assert all(bool(block_mask(1, 1, g, min_block=1).all()) for _ in range(20))
    assert all(bool(block_mask(2, 4, g).all()) for _ in range(20))
