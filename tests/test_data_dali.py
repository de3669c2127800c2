"""DALI backend (CPU-only pipelines here, device_id=None), `mae data check`, and parity with torchvision."""

import io
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.config import DataConfig
from pipelines import DataError, build_loader, dali_available, embedded_images, list_images
from pipelines.common import sample_crop

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")


def photo(seed, size=(96, 72)):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(((base + rng.integers(0, 60, base.shape)) % 256).astype(np.uint8))


def make_bad_tree(root):
    good = root / "good"
    good.mkdir(parents=True)
    for i in range(6):
        photo(i).save(good / f"g{i}.jpg", quality=90)
    bad = root / "bad"
    bad.mkdir()
    buf = io.BytesIO()
    photo(9).save(buf, format="JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    Image.new("CMYK", (40, 30), (10, 20, 30, 40)).save(bad / "cmyk.jpg")
    photo(3).save(bad / "png_named.jpg", format="PNG")
    photo(4, (400, 300)).save(bad / "huge.jpg")
    notes = root / "notes"
    notes.mkdir()
    photo(5).convert("L").save(notes / "gray.jpg")
    photo(6).save(notes / "real.png")
    (root / "README.txt").write_text("labels ignored")
    return root


BAD = {"truncated.jpg": "corrupt", "empty.jpg": "zero_bytes", "text.jpg": "not_image", "cmyk.jpg": "cmyk",
       "png_named.jpg": "format_mismatch", "huge.jpg": "huge"}


def test_data_check_finds_each_kind_and_quarantines(tmp_path, capsys):
    root = make_bad_tree(tmp_path / "d")
    code = main(["data", "check", str(root), "--max-pixels", "100000"])
    out = capsys.readouterr().out
    assert code == 1
    for name, kind in BAD.items():
        assert any(name in line and kind in line and "BAD" in line for line in out.splitlines()), (name, out)
    assert "grayscale" in out and "png" in out  # noted, not quarantined
    q = (root / ".mae_quarantine.txt").read_text().splitlines()
    listed = {json.loads(line)["path"].rsplit("/", 1)[-1] for line in q if not line.startswith("#")}
    assert listed == set(BAD)
    # both backends now skip them
    imgs, others = list_images(str(root))
    assert {p.rsplit("/", 1)[-1] for p in imgs} == {f"g{i}.jpg" for i in range(6)} | {"gray.jpg", "real.png"}


def test_data_check_clean_dir_and_errors(tmp_path, capsys):
    (tmp_path / "ok").mkdir()
    photo(0).save(tmp_path / "ok" / "a.jpg")
    assert main(["data", "check", str(tmp_path / "ok")]) == 0
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_data_check_strict_quarantines_notes(tmp_path):
    root = make_bad_tree(tmp_path / "d")
    assert main(["data", "check", str(root), "--strict", "--out", str(tmp_path / "q.txt")]) == 1
    text = (tmp_path / "q.txt").read_text()
    assert "gray.jpg" in text and "real.png" in text


@needs_dali
def test_dali_cpu_pipeline_shape_dtype_normalisation():
    cfg = DataConfig(backend="dali", num_workers=2)
    ld = build_loader(cfg, 32, 4, "cpu", seed=0)
    assert type(ld).__name__ == "DaliLoader"
    x = next(ld.stream(0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert -2.2 < x.min() < 0 < x.max() < 2.7


@needs_dali
def test_dali_resume_continues_with_next_unseen_batch():
    cfg = DataConfig(backend="dali", num_workers=2)
    a = build_loader(cfg, 32, 8, "cpu", seed=1)
    s = a.stream(0)
    for _ in range(3):
        next(s)
    state = a.state_dict()
    want = [next(s) for _ in range(4)]
    b = build_loader(cfg, 32, 8, "cpu", seed=1)
    b.load_state_dict(state)
    s2 = b.stream(3)
    got = [next(s2) for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(want, got))
    assert b.replayed == 0  # the pipeline's own state brought it there, not a replay of 3 batches
    c = build_loader(cfg, 32, 8, "cpu", seed=1)  # the fallback without a state: the same batches, by replaying
    s3 = c.stream(3)
    assert all(torch.equal(u, next(s3)) for u in want) and c.replayed == 3


@needs_dali
def test_dali_shards_disjoint_equal_counts(tmp_path):
    files = []
    for i in range(21):
        p = tmp_path / f"{i:02d}.png"
        Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(p)
        files.append(str(p))
    from pipelines.dali import DaliLoader

    cfg = DataConfig(backend="dali", num_workers=1, mean=(0, 0, 0), std=(1, 1, 1))
    seen = []
    for rank in range(2):
        ld = DaliLoader(files, 1, 16, 4, cfg, 0, "cpu", rank=rank, world=2, deterministic=True)
        assert ld.batches_per_epoch == 2  # ceil(21 / 2) = 11 per shard -> 2 full batches of 4
        s = ld.stream(0)
        vals = torch.cat([next(s)[:, 0, 0, 0] for _ in range(2)])
        seen.append(set(torch.round(vals * 255 / 10).int().tolist()))
    assert not (seen[0] & seen[1]) and len(seen[0]) == len(seen[1]) == 8


@needs_dali
def test_dali_names_an_undecodable_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(4):
        photo(i).save(d / f"g{i}.jpg")
    (d / "zz_text.jpg").write_text("definitely not a jpeg")
    cfg = DataConfig(path=str(d), backend="dali", num_workers=1)
    ld = build_loader(cfg, 32, 5, "cpu", seed=0)
    with pytest.raises(DataError, match=r"DALI could not decode.*zz_text.jpg \(not_image.*mae data check"):
        next(ld.stream(0))


@needs_dali
def test_parity_deterministic_mode_on_real_photographs():
    from pipelines.dali import DaliLoader
    from pipelines.torchvision import ImageFiles

    cfg = DataConfig(backend="dali", num_workers=1)
    ds = ImageFiles([], 64, cfg.scale, cfg.ratio, 0.0, cfg.mean, cfg.std, 0, deterministic=True)
    for f in embedded_images():
        d = next(DaliLoader([f], 1, 64, 1, cfg, 0, "cpu", deterministic=True).stream(0))[0]
        t = ds.transform(ds.load(f), None)
        assert d.shape == t.shape == (3, 64, 64)
        diff = (d - t).abs()
        assert diff.mean() < 0.01, (f, diff.mean())  # normalised units: measured ~0.002
        assert torch.corrcoef(torch.stack([d.flatten(), t.flatten()]))[0, 1] > 0.99


@needs_dali
def test_parity_crop_distribution():
    from pipelines.dali import crop_sizes

    f = [x for x in embedded_images() if x.endswith("coffee.png")]  # 600 x 400
    W, H = 600, 400
    dali = crop_sizes(f, (0.2, 1.0), (3 / 4, 4 / 3), n_batches=40, batch_size=25)
    rng = random.Random(0)
    tv = [sample_crop(W, H, (0.2, 1.0), (3 / 4, 4 / 3), rng)[2:] for _ in range(len(dali))]

    def stats(sizes):
        area = np.array([h * w / (W * H) for h, w in sizes])
        asp = np.array([math.log(w / h) for h, w in sizes])
        return area.mean(), np.quantile(area, [0.1, 0.5, 0.9]), asp.mean(), asp.std()

    (am_d, aq_d, sm_d, ss_d), (am_t, aq_t, sm_t, ss_t) = stats(dali), stats(tv)
    assert abs(am_d - am_t) < 0.04, (am_d, am_t)
    assert np.all(np.abs(aq_d - aq_t) < 0.08), (aq_d, aq_t)
    assert abs(sm_d - sm_t) < 0.04 and abs(ss_d - ss_t) < 0.04, (sm_d, sm_t, ss_d, ss_t)


@needs_dali
def test_training_with_dali_resumes_bit_identically(tmp_path):
    from conftest import debug_cfg
    from engine.trainer import Trainer

    over = {"data.backend": "dali", "data.num_workers": "2", "train.ckpt_every": "100"}
    straight = Trainer(debug_cfg(tmp_path / "a", **over, **{"train.max_steps": 6}))
    straight.fit()
    Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 3})).fit()
    resumed = Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 6}), resume=True)
    assert resumed.loader._checkpoint is not None  # the DALI pipeline state came back
    resumed.fit()
    assert resumed.loader.replayed == 0  # and was used: nothing was replayed to reach step 3
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_auto_backend_choice():
    ld = build_loader(DataConfig(num_workers=1), 32, 4, "cpu", seed=0)
    assert type(ld).__name__ == ("DaliLoader" if dali_available() else "TorchvisionLoader")
    with pytest.raises(Exception, match="synthetic|torchvision|dali"):
        DataConfig(backend="ffcv")


def _left_right_image(path, w=48, h=32):
    """Bright left half, dark right half: a horizontal flip is unmistakable."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = 220
    a[:, w // 2:] = 20
    Image.fromarray(a).save(path)
    return str(path)


def _flipped_share(batch: torch.Tensor) -> tuple[float, int]:
    """Share of images whose left half is darker than their right (flipped), and how many are neither."""
    w = batch.shape[-1]
    left, right = batch[..., : w // 2].mean((1, 2, 3)), batch[..., w // 2:].mean((1, 2, 3))
    return float((left < right).float().mean()), int(((left - right).abs() < 0.5).sum())


def _loader(backend, files, hflip, batch=64, seed=3):
    from pipelines.dali import DaliLoader
    from pipelines.torchvision import TorchvisionLoader

    # full-image crops (area 1, the image's own aspect): only the flip varies
    cfg = DataConfig(backend=backend, num_workers=1, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=hflip)
    cls = DaliLoader if backend == "dali" else TorchvisionLoader
    return cls(files, 64, 32, batch, cfg, seed, "cpu")


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=needs_dali)])
def test_horizontal_flip_rate_and_exactness(tmp_path, backend):
    """hflip=0 never flips, hflip=1 always does (the same crops, mirrored exactly), hflip=0.5 flips about half:
    in both backends, so their flip statistics agree."""
    files = [_left_right_image(tmp_path / "lr.png")]
    none = next(_loader(backend, files, 0.0).stream(0))
    every = next(_loader(backend, files, 1.0).stream(0))
    half = next(_loader(backend, files, 0.5).stream(0))
    assert _flipped_share(none) == (0.0, 0) and _flipped_share(every) == (1.0, 0)
    torch.testing.assert_close(every, none.flip(-1), rtol=0, atol=1e-5)
    share, unclear = _flipped_share(half)
    assert unclear == 0 and 0.3 <= share <= 0.7, share


@needs_dali
def test_dali_names_a_truncated_jpeg_whose_header_is_intact(tmp_path):
    """A JPEG cut after its headers decodes nowhere, yet a header check passes it: the loader decodes the files its
    rank had not read yet and names it."""
    d = tmp_path / "d"
    d.mkdir()
    for i in range(6):
        photo(i, (160, 120)).save(d / f"g{i}.jpg", quality=95)
    buf = io.BytesIO()
    photo(7, (160, 120)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    (d / "cut.jpg").write_bytes(data[: int(len(data) * 0.6)])  # SOS and part of the scan: headers intact
    from pipelines.check import check_file

    assert not check_file(str(d / "cut.jpg"), decode=False).bad  # the case the old message could not name
    ld = build_loader(DataConfig(path=str(d), backend="dali", num_workers=1), 32, 7, "cpu", seed=0)
    with pytest.raises(DataError, match=r"DALI could not decode an image .*the file\(s\) that cannot be decoded: "
                                        r".*cut.jpg \(corrupt"):
        next(ld.stream(0))


@needs_dali
def test_a_bad_file_met_mid_run_under_dali_keeps_the_checkpoints(tmp_path, capsys):
    """A run that meets an undecodable file (here one that appeared in the data between two runs) stops with the
    file named and exit 2; the checkpoints written before are intact and resumable."""
    d = tmp_path / "d"
    d.mkdir()
    for i in range(12):
        photo(i).save(d / f"g{i:02d}.jpg")
    args = ["pretrain", "--preset", "debug", "--data", str(d), "--run-dir", str(tmp_path / "run"), "--train.device",
            "cpu", "--data.backend", "dali", "--data.num_workers", "1", "--train.batch_size", "4",
            "--train.tensorboard", "false", "--train.ckpt_every", "2", "--train.vis_every", "0"]
    assert main(args + ["--train.max_steps", "2"]) == 0
    (d / "zz_text.jpg").write_text("not a jpeg at all")
    assert main(args + ["--train.max_steps", "40", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "zz_text.jpg" in err and "Traceback" not in err
    from engine import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "ckpt_00000002.pt" and ckpt.load_checkpoint(latest)["step"] == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uint8_transfer_gives_the_float32_batches_bit_for_bit(tmp_path, dtype):
    """data.transfer uint8 (pixels over the bus, normalised on the device) against the paper's float32 workers."""
    from pipelines.torchvision import TorchvisionLoader

    files = []
    for i in range(6):
        photo(i).save(tmp_path / f"p{i}.jpg", quality=90)
        files.append(str(tmp_path / f"p{i}.jpg"))
    batches = {}
    for transfer in ("uint8", "float32"):
        cfg = DataConfig(path=str(tmp_path), backend="torchvision", num_workers=0, transfer=transfer, dtype=dtype)
        s = TorchvisionLoader(files, 2, 32, 4, cfg, 5, "cpu").stream(0)
        batches[transfer] = [next(s) for _ in range(3)]
    for a, b in zip(batches["uint8"], batches["float32"]):
        assert a.dtype == b.dtype == getattr(torch, dtype)
        assert torch.equal(a, b)


def test_dali_parity_statistics_catch_a_biased_augmentation(tmp_path):
    """The GPU-vs-CPU parity checks (benchmarks/dali_parity.py) on this machine: DALI CPU against torchvision
    passes; a crop draw biased to larger areas, a flip rate of 0.7 and shifted pixels are each caught."""
    from benchmarks import dali_parity as dp

    files = dp.photo_jpegs(tmp_path / "photos")
    lr = dp.left_right_jpeg(tmp_path)
    ref = dp.collect("dali", "cpu", files, lr) if dali_available() else dp.collect("torchvision", "cpu", files, lr, seed=1)
    cand = dp.collect("torchvision", "cpu", files, lr)
    rows = dp.compare(cand, ref)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]

    rng = random.Random(0)
    biased = dict(cand, **dp.crop_stats([sample_crop(dp.W, dp.H, (0.35, 1.0), (3 / 4, 4 / 3), rng)[2:]
                                         for _ in range(1000)]))
    failed = {r["check"] for r in dp.compare(biased, ref) if not r["ok"]}
    assert "crop area, mean" in failed
    failed = {r["check"] for r in dp.compare(dict(cand, flip_share=0.7), ref) if not r["ok"]}
    assert failed == {"flip share at 0.5"}
    shifted = dict(cand, channel_mean=[m + 0.1 for m in cand["channel_mean"]],
                   _deterministic=cand["_deterministic"] + 0.05)
    failed = {r["check"] for r in dp.compare(shifted, ref) if not r["ok"]}
    assert failed == {"channel 0 mean", "channel 1 mean", "channel 2 mean",
                      "deterministic decode, worst image mean abs diff"}


@pytest.mark.skipif(not (torch.cuda.is_available() and dali_available()), reason="needs a GPU and DALI")
def test_dali_gpu_decode_matches_cpu_decode(tmp_path):
    """On a GPU machine: DALI's mixed decoder (hardware decoder on and off) against its CPU decoder, by the
    augmentation's statistics (crop area and aspect, flip rate, normalised pixels, the deterministic decode)."""
    from benchmarks import dali_parity as dp

    assert dp.main(["--device", "cuda", "--out", str(tmp_path)]) == 0, next(tmp_path.glob("*.md")).read_text()


def test_hw_decoder_load_reaches_the_mixed_decoder_only():
    """data.hw_decoder_load goes to DALI's GPU (mixed) decoder; the CPU decoder takes no such argument."""
    from pipelines.dali import augment

    calls = []

    class Fn:
        class decoders:
            @staticmethod
            def image_random_crop(*a, **k):
                calls.append(k)
                return "img"

            image = image_random_crop

        class random:
            @staticmethod
            def coin_flip(**k):
                return 0

        @staticmethod
        def resize(x, **k):
            return x

        @staticmethod
        def crop_mirror_normalize(x, **k):
            return x

    types = type("T", (), {"RGB": 0, "INTERP_CUBIC": 0})
    for device, det in (("mixed", False), ("cpu", False), ("mixed", True)):
        augment(Fn, types, "enc", 32, (0.2, 1), (0.75, 1.33), 0.5, (0, 0, 0), (1, 1, 1), device, None, det, 0.0)
    assert [c.get("hw_decoder_load") for c in calls] == [0.0, None, 0.0]
    assert "hw_decoder_load" not in calls[1]
    with pytest.raises(Exception, match="hw_decoder_load"):
        DataConfig(hw_decoder_load=1.5)
    with pytest.raises(Exception, match="transfer"):
        DataConfig(transfer="float16")


def test_torchvision_workers_are_not_forked_from_a_process_that_used_dali(monkeypatch):
    """DALI's threads do not survive a fork (torchvision workers forked after a DALI pipeline died of SIGSEGV):
    once DALI is used, workers start from a clean forkserver; before that they fork (faster)."""
    import pipelines.dali as pd
    from pipelines.torchvision import worker_context

    monkeypatch.setattr(pd, "USED", False)
    assert worker_context() is None
    monkeypatch.setattr(pd, "USED", True)
    assert worker_context().get_start_method() == "forkserver"
