import math
import random

import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from pipelines import DataError, build_loader, embedded_images, list_images
from pipelines.common import EpochPlan, sample_crop


def make_tree(root):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(5):
        Image.new("RGB", (64 + i, 48), (i * 40, 100, 50)).save(root / "a" / f"img{i}.jpg")
    Image.new("L", (40, 40), 90).save(root / "b" / "gray.png")
    (root / "b" / "readme.txt").write_text("not an image")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "b" / "empty.png").write_bytes(b"")
    return root


def test_embedded_photographs_exist():
    files = embedded_images()
    assert len(files) >= 8
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and min(im.size) >= 300


def test_listing_and_non_images(tmp_path):
    make_tree(tmp_path)
    imgs, others = list_images(str(tmp_path))
    assert len(imgs) == 8 and [o.split("/")[-1] for o in others] == ["readme.txt"]


def test_unreadable_files_skipped_with_one_warning(tmp_path, capfd):
    make_tree(tmp_path)
    cfg = DataConfig(path=str(tmp_path), num_workers=0, backend="torchvision")
    loader = build_loader(cfg, 32, 4, "cpu", seed=0)
    stream = loader.stream(0)
    batches = [next(stream) for _ in range(2 * loader.batches_per_epoch)]
    err = capfd.readouterr().err
    assert all(b.shape == (4, 3, 32, 32) and torch.isfinite(b).all() for b in batches)
    lines = err.splitlines()
    assert sum("broken.jpg" in line for line in lines) == 1 and sum("empty.png" in line for line in lines) == 1
    assert "readme.txt" in err


def test_quarantine_list_excludes_files(tmp_path):
    make_tree(tmp_path)
    (tmp_path / ".mae_quarantine.txt").write_text(f"{tmp_path}/b/broken.jpg\n{tmp_path}/b/empty.png\n")
    imgs, _ = list_images(str(tmp_path))
    assert len(imgs) == 6 and not any("broken" in f for f in imgs)


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_images(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no images found"):
        list_images(str(tmp_path))


def test_augmentation_normalised_and_deterministic():
    cfg = DataConfig(num_workers=0, backend="torchvision")
    a = build_loader(cfg, 32, 8, "cpu", seed=3)
    b = build_loader(cfg, 32, 8, "cpu", seed=3)
    xa, xb = next(a.stream(5)), next(b.stream(5))
    assert torch.equal(xa, xb)
    assert -2.2 < xa.min() < 0 < xa.max() < 2.7  # ImageNet normalised
    assert not torch.equal(xa, next(build_loader(cfg, 32, 8, "cpu", seed=4).stream(5)))


def test_epoch_plan_shards_evenly_and_resumes():
    plans = [EpochPlan(103, 4, seed=1, rank=r, world=3) for r in range(3)]
    assert all(p.batches_per_epoch == 8 for p in plans)
    # a global micro-batch holds the same samples whatever the world size
    one = EpochPlan(103, 12, seed=1)
    g = next_n(one.batches(0), 3)
    for j in range(3):
        assert sum((next_n(p.batches(j), 1)[0] for p in plans), []) == g[j]
    seen = [set(i for _, i in sum((next_n(p.batches(0), 8)), [])) for p in plans]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
    full = next_n(plans[0].batches(0), 20)
    assert next_n(plans[0].batches(13), 7) == full[13:]
    assert full[8][0][0] == 1  # second epoch


def next_n(it, n):
    return [next(it) for _ in range(n)]


def test_crop_sampler_statistics():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(4000):
        top, left, h, w = sample_crop(400, 400, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 400 - h and 0 <= left <= 400 - w
        areas.append(h * w / (400 * 400))
        ratios.append(math.log(w / h))
    assert 0.18 <= min(areas) and max(areas) <= 1.0
    assert abs(sum(ratios) / len(ratios)) < 0.03
    assert 0.5 < sum(areas) / len(areas) < 0.62


@pytest.mark.parametrize("backend", ["torchvision", "synthetic", "dali"])
def test_bfloat16_batches_are_the_float32_batches_rounded(backend):
    """--data.dtype bfloat16 hands the model bf16 batches (half the copy), the same images rounded once."""
    from pipelines import dali_available

    if backend == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    a = next(build_loader(DataConfig(backend=backend, num_workers=0, dtype="float32"), 32, 4, "cpu", seed=2).stream(0))
    b = next(build_loader(DataConfig(backend=backend, num_workers=0, dtype="bfloat16"), 32, 4, "cpu", seed=2)
             .stream(0))
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and a.shape == b.shape
    if backend == "dali":  # DALI normalises in fp16 for a bf16 batch: within fp16's rounding of the same image
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(b, a.to(torch.bfloat16))


def test_training_on_bf16_synthetic_batches_runs_and_resumes(tmp_path):
    """The synthetic backend (benchmarks' on-device input) and bf16 batches through the real trainer."""
    from conftest import debug_cfg
    from engine.trainer import Trainer

    over = {"data.backend": "synthetic", "data.dtype": "bfloat16", "train.ckpt_every": 100}
    straight = Trainer(debug_cfg(tmp_path / "a", **over, **{"train.max_steps": 4}))
    assert straight.loader.name == "synthetic"
    res = straight.fit()
    assert res.step == 4 and math.isfinite(res.last_loss)
    Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 2})).fit()
    resumed = Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 4}), resume=True)
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_non_image_files_get_one_warning_naming_them(tmp_path, capfd):
    make_tree(tmp_path)
    (tmp_path / "b" / "labels.csv").write_text("x")
    build_loader(DataConfig(path=str(tmp_path), num_workers=0, backend="torchvision"), 32, 4, "cpu", seed=0)
    err = [line for line in capfd.readouterr().err.splitlines() if "non-image" in line]
    assert len(err) == 1 and "readme.txt" in err[0] and "labels.csv" in err[0] and "2 non-image" in err[0]


def _mirror_test_image(path):
    """An image whose left and right halves differ, so a flip shows."""
    t = torch.arange(32 * 32 * 3, dtype=torch.int64).reshape(32, 32, 3) % 251
    Image.fromarray(t.to(torch.uint8).numpy()).save(path)
    return path


def test_the_flip_mirrors_left_to_right_at_its_probability_and_only_outside_the_deterministic_mode(tmp_path):
    """A crop of the whole image (scale and aspect fixed at 1) at its own size: each sample is the image or its
    left-right mirror, exactly, drawn from the sample's own stream; hflip 0 never flips, 1 always, 0.5 about half;
    the deterministic mode (parity tests) resizes the whole image and never flips."""
    import torchvision.transforms.functional as TF

    from pipelines.torchvision import ImageFiles

    path = str(_mirror_test_image(tmp_path / "m.png"))
    plain = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    mirrored = plain.flip(-1)

    def samples(hflip, n, deterministic=False):
        ds = ImageFiles([path], 32, (1.0, 1.0), (1.0, 1.0), hflip, [0.0] * 3, [1.0] * 3, seed=5,
                        deterministic=deterministic)
        ds.uint8 = True
        return [ds[(0, i)] for i in range(n)]

    assert all(torch.equal(x, plain) for x in samples(0.0, 20))
    assert all(torch.equal(x, mirrored) for x in samples(1.0, 20))
    half = samples(0.5, 400)
    flips = [torch.equal(x, mirrored) for x in half]
    assert all(f or torch.equal(x, plain) for x, f in zip(half, flips))
    assert 160 < sum(flips) < 240  # binomial(400, 1/2): 4 standard deviations
    assert [torch.equal(x, mirrored) for x in samples(0.5, 400)] == flips  # the sample's stream decides
    assert all(torch.equal(x, plain) for x in samples(1.0, 5, deterministic=True))


def test_a_sample_is_normalised_with_the_given_mean_and_std(tmp_path):
    from pipelines.torchvision import ImageFiles

    path = str(_mirror_test_image(tmp_path / "m.png"))
    ds = ImageFiles([path], 32, (1.0, 1.0), (1.0, 1.0), 0.0, [0.2, 0.4, 0.6], [0.5, 0.25, 2.0], seed=0)
    x = ds[(0, 0)]
    raw = torch.from_numpy(__import__("numpy").array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    want = (raw - torch.tensor([0.2, 0.4, 0.6])[:, None, None]) / torch.tensor([0.5, 0.25, 2.0])[:, None, None]
    assert x.dtype == torch.float32 and torch.allclose(x, want, atol=1e-6)


def test_both_resizes_are_bicubic_at_the_sampled_box(tmp_path):
    """The training crop is torchvision's resized_crop at the box sample_crop draws from the sample's stream, bicubic;
    the deterministic mode is the whole image resized, bicubic (downscaled here, where the filter shows)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from pipelines.common import sample_rng
    from pipelines.torchvision import ImageFiles

    path = str(_mirror_test_image(tmp_path / "m.png"))
    img = Image.open(path).convert("RGB")
    for deterministic in (False, True):
        ds = ImageFiles([path], 12, (0.3, 1.0), (3 / 4, 4 / 3), 0.0, [0.0] * 3, [1.0] * 3, seed=2,
                        deterministic=deterministic)
        ds.uint8 = True
        for i in range(4):
            if deterministic:
                want = TF.resize(img, [12, 12], InterpolationMode.BICUBIC, antialias=True)
            else:
                top, left, h, w = sample_crop(32, 32, (0.3, 1.0), (3 / 4, 4 / 3), sample_rng(2, 1, i))
                want = TF.resized_crop(img, top, left, h, w, [12, 12], InterpolationMode.BICUBIC, antialias=True)
            assert torch.equal(ds[(1, i)], TF.pil_to_tensor(want)), (deterministic, i)


def test_a_samples_stream_depends_on_the_seed_the_epoch_and_the_index(tmp_path):
    from pipelines.torchvision import ImageFiles

    path = str(_mirror_test_image(tmp_path / "m.png"))

    def sample(seed, epoch, index):
        ds = ImageFiles([path], 16, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, [0.0] * 3, [1.0] * 3, seed=seed)
        return ds[(epoch, index)]

    base = sample(1, 0, 0)
    assert torch.equal(base, sample(1, 0, 0))
    assert not torch.equal(base, sample(2, 0, 0))
    assert not torch.equal(base, sample(1, 1, 0))
    assert not torch.equal(base, sample(1, 0, 1))


def test_an_unreadable_file_is_replaced_by_the_next_one_and_named_with_its_error(tmp_path):
    from pipelines.torchvision import ImageFiles

    bad = tmp_path / "a_bad.jpg"
    bad.write_bytes(b"not an image")
    good = [tmp_path / "b.png", tmp_path / "c.png"]
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good[0])
    Image.new("RGB", (8, 8), (10, 200, 10)).save(good[1])
    ds = ImageFiles([str(bad), *map(str, good)], 8, (1.0, 1.0), (1.0, 1.0), 0.0, [0.0] * 3, [1.0] * 3, seed=0,
                    deterministic=True)
    ds.uint8 = True
    x, skipped = ds.get_with_skips((0, 0))
    assert torch.equal(x[:, 0, 0], torch.tensor([200, 10, 10], dtype=torch.uint8))  # the next file, b.png
    assert skipped == [(str(bad), f"UnidentifiedImageError: cannot identify image file '{bad}'")]
