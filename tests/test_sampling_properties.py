"""The sampling that decides which images a run sees, for any size (hypothesis): the epoch plan (every sample at most
once per epoch, the same global micro-batches whatever the world size, resume from any counter) and the crop
sampler (boxes inside the image, the scale and aspect asked for, torchvision's fallback to a central crop)."""

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.common import DataError, EpochPlan, sample_crop, sample_rng


@settings(max_examples=60, deadline=None)
@given(samples=st.integers(1, 300), batch=st.integers(1, 16), world=st.integers(1, 6), seed=st.integers(0, 10**6),
       epoch=st.integers(0, 5))
def test_every_sample_at_most_once_per_epoch_on_every_rank_split(samples, batch, world, seed, epoch):
    if samples < batch * world:
        with pytest.raises(DataError) as e:
            EpochPlan(samples, batch, seed, 0, world)
        assert str(e.value) == (f"{samples} samples per epoch cannot fill one batch of {batch} on each of {world} "
                                "rank(s); lower train.batch_size or raise data.repeat")
        return
    plans = [EpochPlan(samples, batch, seed, r, world) for r in range(world)]
    per_rank = samples // (batch * world)
    assert all(p.batches_per_epoch == per_rank for p in plans)
    ranks = [p.epoch_indices(epoch) for p in plans]
    assert all(len(idx) == per_rank * batch for idx in ranks)
    together = sum(ranks, [])
    assert len(set(together)) == len(together) == per_rank * batch * world  # the remainder only is dropped
    assert all(0 <= i < samples for i in together)
    # global micro-batch j is the same set of samples as in a one-rank run with batch x world
    one = EpochPlan(samples, batch * world, seed).epoch_indices(epoch)
    for j in range(per_rank):
        glob = sum((idx[j * batch:(j + 1) * batch] for idx in ranks), [])
        assert glob == one[j * batch * world:(j + 1) * batch * world]
    assert plans[0].epoch_indices(epoch) == EpochPlan(samples, batch, seed, 0, world).epoch_indices(epoch)


@settings(max_examples=40, deadline=None)
@given(samples=st.integers(4, 60), batch=st.integers(1, 4), world=st.integers(1, 3), seed=st.integers(0, 99),
       start=st.integers(0, 40), rank=st.integers(0, 2))
def test_batches_resume_from_any_counter_and_walk_the_epochs(samples, batch, world, seed, start, rank):
    rank = rank % world
    if samples < batch * world:
        return
    plan = EpochPlan(samples, batch, seed, rank, world)
    bpe = plan.batches_per_epoch
    full = list(itertools.islice(plan.batches(0), start + 5))
    assert list(itertools.islice(plan.batches(start), 5)) == full[start:]
    for g, b in enumerate(full):
        epoch, j = divmod(g, bpe)
        assert len(b) == batch
        assert b == [(epoch, i) for i in plan.epoch_indices(epoch)[j * batch:(j + 1) * batch]]


def test_epochs_and_seeds_give_other_orders_and_ranks_are_checked():
    plan = EpochPlan(64, 4, seed=3)
    orders = {tuple(plan.epoch_indices(e)) for e in range(4)}
    assert len(orders) == 4 and all(sorted(o) == list(range(64)) for o in orders)
    assert plan.epoch_indices(0) != EpochPlan(64, 4, seed=4).epoch_indices(0)
    assert plan.epoch_indices(1) != EpochPlan(64, 4, seed=4).epoch_indices(0)  # seed and epoch do not trade
    for rank, world in [(-1, 2), (2, 2), (0, 0)]:
        with pytest.raises(ValueError) as e:
            EpochPlan(64, 4, 0, rank, world)
        assert str(e.value) == f"rank {rank} out of range for world size {world}"


def test_the_augmentation_stream_is_a_function_of_seed_epoch_and_sample():
    draw = [sample_rng(s, e, i).random() for s, e, i in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 10),
                                                         (0, 1, 0)]]
    assert len(set(draw[:5])) == 5 and draw[2] == draw[5]
    assert sample_rng(1, 23, 4).random() != sample_rng(12, 3, 4).random()  # fields are separated


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 600), height=st.integers(1, 600),
       lo=st.floats(0.05, 1.0), hi=st.floats(0.05, 1.0), r_lo=st.floats(0.2, 5.0), r_hi=st.floats(0.2, 5.0),
       seed=st.integers(0, 2**32))
def test_a_crop_box_is_inside_the_image_with_the_scale_and_aspect_asked(width, height, lo, hi, r_lo, r_hi, seed):
    scale, ratio = (min(lo, hi), max(lo, hi)), (min(r_lo, r_hi), max(r_lo, r_hi))
    top, left, h, w = sample_crop(width, height, scale, ratio, random.Random(seed))
    assert 0 <= top <= height - h and 0 <= left <= width - w and 1 <= h and 1 <= w
    if (top, left) != ((height - h) // 2, (width - w) // 2) or (h, w) == (height, width):
        # a sampled box: the area and aspect within the asked ranges, up to rounding of each side
        area = h * w / (width * height)
        slack_w, slack_h = 0.5 / w, 0.5 / h
        assert scale[0] * (1 - slack_w) * (1 - slack_h) - 1e-9 <= area
        assert area <= scale[1] * (1 + slack_w) * (1 + slack_h) + 1e-9 or (h, w) == (height, width)
        if (h, w) != (height, width) and h > 1:
            assert ratio[0] * (1 - slack_w) / (1 + slack_h) - 1e-9 <= w / h
            assert w / h <= ratio[1] * (1 + slack_w) / (1 - slack_h) + 1e-9


def test_a_crop_sample_follows_torchvisions_draws():
    """Ten tries of (area, log-aspect) from the given RNG, then a box position; the same RNG state gives the same
    box, and the draws are exactly these."""
    rng = random.Random(5)
    twin = random.Random(5)
    got = sample_crop(200, 100, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    for _ in range(10):
        target = 200 * 100 * twin.uniform(0.2, 1.0)
        aspect = math.exp(twin.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= 200 and 0 < h <= 100:
            assert got == (twin.randint(0, 100 - h), twin.randint(0, 200 - w), h, w)
            break
    else:
        pytest.fail("no box in ten tries")
    assert rng.random() == twin.random()  # nothing else was drawn


@pytest.mark.parametrize("width,height,ratio,want", [
    (100, 10, (1.0, 1.0), (0, 45, 10, 10)),  # too wide for every aspect: full height, the widest allowed aspect
    (10, 100, (1.0, 1.0), (45, 0, 10, 10)),  # too tall: full width
    (300, 10, (0.5, 2.0), (0, 140, 10, 20)),
    (10, 300, (0.5, 2.0), (140, 0, 20, 10)),
    (1, 1, (0.5, 0.5), (0, 0, 1, 1)),  # torchvision's rounding would give a 0-pixel width
    (3, 1, (0.2, 0.2), (0, 1, 1, 1)),
])
def test_the_fallback_is_a_central_crop_of_the_nearest_allowed_aspect(width, height, ratio, want):
    assert sample_crop(width, height, (1.0, 1.0), ratio, random.Random(0)) == want


def test_the_fallback_keeps_the_whole_image_when_its_aspect_is_allowed():
    """scale above 1 never fits: the fallback, and an image whose own aspect is allowed is kept whole."""
    assert sample_crop(40, 30, (1.5, 2.0), (0.5, 2.0), random.Random(0)) == (0, 0, 30, 40)
    assert sample_crop(40, 20, (1.5, 2.0), (0.5, 2.0), random.Random(0)) == (0, 0, 20, 40)  # aspect 2: the bound


@pytest.mark.parametrize("width, height, scale, want_top, want_left", [
    (100, 200, 0.5, True, False),  # a crop as wide as the image: its top is drawn, its left is 0
    (200, 100, 0.5, False, True),  # as tall as the image: its left is drawn
    (1, 10, 0.1, True, False),  # one pixel wide
    (10, 1, 0.1, False, True),  # one pixel tall
])
def test_a_crop_touching_the_image_edges_or_one_pixel_across_is_accepted_not_replaced(width, height, scale, want_top,
                                                                                      want_left):
    """A box exactly as wide (tall) as the image, or one pixel across, is a valid draw (torchvision's
    0 < w <= width): it is placed at random, not replaced by the central fallback."""
    boxes = {sample_crop(width, height, (scale, scale), (1.0, 1.0), random.Random(s)) for s in range(40)}
    tops, lefts = {b[0] for b in boxes}, {b[1] for b in boxes}
    assert (len(tops) > 1) == want_top and (len(lefts) > 1) == want_left
    assert all(0 <= t <= height - h and 0 <= left <= width - w for t, left, h, w in boxes)


def test_the_fallback_comes_after_exactly_ten_tries_and_a_one_pixel_side_stays_one_pixel():
    """torchvision tries 10 boxes (two draws each) before its central fallback; a 1 x 5 image whose every box is
    too wide falls back to the whole width and the allowed aspect's height, rounded, never less than 1 pixel."""
    rng = random.Random(7)
    assert sample_crop(1, 5, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (2, 0, 1, 1)
    spent = random.Random(7)
    for _ in range(20):
        spent.random()
    assert rng.getstate() == spent.getstate()
    assert sample_crop(5, 1, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(7)) == (0, 2, 1, 1)


def test_the_batches_start_at_the_first_micro_batch_unless_told():
    plan = EpochPlan(20, 2, seed=3)
    idx = plan.epoch_indices(0)
    assert next(plan.batches()) == [(0, i) for i in idx[:2]]
