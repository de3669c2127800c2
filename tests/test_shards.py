"""Packed datasets (`mae data pack`): webdataset tar shards, DALI index files and a manifest; read by both backends,
sharded by rank, resumable, with damaged shards named."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.config import DataConfig
from pipelines import DataError, build_loader, dali_available
from pipelines.shards import open_shards, pack, parse_size

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")
ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, n: int = 24, classes=("cats", "dogs")) -> Path:
    """n small images (each a solid colour that encodes its number) in class subfolders, plus one bad file."""
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32, 3), (i * 9 % 256, 255 - i * 9 % 256, 60), np.uint8)).save(
            d / f"img{i:03d}.png")
    (root / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def _keys(out: Path) -> list[str]:
    keys = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as t:
            keys += [m.name for m in t.getmembers()]
    return keys


def test_pack_writes_shards_indices_and_a_manifest(tmp_path, capsys):
    src = _tree(tmp_path / "src")
    assert main(["data", "pack", str(src), str(tmp_path / "out"), "--per-shard", "10", "--labels", "--quiet"]) == 0
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    assert [s["samples"] for s in m["shards"]] == [10, 10, 4] and m["samples"] == 24
    assert m["classes"] == ["cats", "dogs"] and m["left_out"][0]["path"].endswith("broken.jpg")
    assert "left out 1 file(s)" in capsys.readouterr().out
    keys = _keys(out)
    assert keys[:2] == ["000000000.png", "000000000.cls"] and len(keys) == 48
    # the index is DALI's (wds2idx v1.2): each component's data offset and size in its shard
    idx = (out / "shard-000000.idx").read_text().splitlines()
    assert idx[0] == "v1.2 10"
    ext, off, size, name = idx[1].split()[:4]
    raw = (out / "shard-000000.tar").read_bytes()[int(off): int(off) + int(size)]
    with tarfile.open(out / "shard-000000.tar") as t:
        assert raw == t.extractfile(name).read()
    # the same seed gives the same order; another seed another
    pack(str(src), str(tmp_path / "again"), per_shard=10, labels=True, progress=False, log=lambda m: None)
    assert _keys(tmp_path / "again") == keys
    pack(str(src), str(tmp_path / "other"), per_shard=10, seed=1, progress=False, log=lambda m: None)
    first = [(tmp_path / "out" / "shard-000000.tar").read_bytes()[:2000]]
    assert (tmp_path / "other" / "shard-000000.tar").read_bytes()[:2000] != first[0]


def test_shard_size_in_bytes_and_bad_arguments(tmp_path, capsys):
    src = _tree(tmp_path / "src")
    assert parse_size("1GB") == 2**30 and parse_size("512k") == 512 * 1024
    m = pack(str(src), str(tmp_path / "o"), shard_bytes=parse_size("4KB"), progress=False, log=lambda m: None)
    # about 4 KB of members each (a tar file is padded to its 10 KiB record size)
    assert len(m["shards"]) > 2 and all(s["bytes"] <= 10240 + 4096 for s in m["shards"])
    assert main(["data", "pack", str(src), str(tmp_path / "x")]) == 2
    assert "give one of --shard-size" in capsys.readouterr().err
    assert main(["data", "pack", str(src), str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert "--shard-size must be a size" in capsys.readouterr().err
    assert main(["data", "pack", str(src), str(src / "inside"), "--per-shard", "5"]) == 2


def test_a_killed_pack_resumes_without_duplicating(tmp_path):
    """SIGKILL after the second shard: starting again keeps the shards written and adds the rest; the result is
    the same dataset as an uninterrupted pack."""
    src = _tree(tmp_path / "src")
    child = (f"import os, signal\nimport pipelines.shards as s\nreal = s._write_shard\nn = [0]\n"
             f"def w(*a, **k):\n    n[0] += 1\n    if n[0] == 3:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
             f"    return real(*a, **k)\ns._write_shard = w\n"
             f"s.pack({str(src)!r}, {str(tmp_path / 'out')!r}, per_shard=5, progress=False)\n")
    r = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (out / "manifest.json").exists() and (out / ".manifest.partial.json").exists()
    logs = []
    pack(str(src), str(out), per_shard=5, progress=False, log=logs.append)
    assert "resuming the pack: 2 of 5 shard(s) already written" in logs[0]
    pack(str(src), str(tmp_path / "straight"), per_shard=5, progress=False, log=lambda m: None)
    assert _keys(out) == _keys(tmp_path / "straight")
    for a, b in zip(sorted(out.glob("*.tar")), sorted((tmp_path / "straight").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()


def _colour_index(batch: torch.Tensor, cfg: DataConfig) -> list[int]:
    """The sample numbers the solid colours of a deterministic batch encode (red channel = 9 * i mod 256)."""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    red = ((batch * std + mean)[:, 0].mean((1, 2)) * 255).round().long()
    lut = {i * 9 % 256: i for i in range(24)}
    return [lut[int(r)] for r in red]


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=needs_dali)])
def test_both_backends_read_every_sample_once_per_epoch_split_by_rank(tmp_path, backend):
    """Two ranks (as two processes of a job would build them): each sample of the manifest once per epoch across
    the ranks, equal batch counts."""
    src = _tree(tmp_path / "src")
    pack(str(src), str(tmp_path / "out"), per_shard=7, progress=False, log=lambda m: None)
    cfg = DataConfig(path=str(tmp_path / "out"), backend=backend, num_workers=0, scale=(1.0, 1.0),
                     ratio=(32 / 24, 32 / 24), hflip=0.0)
    seen, counts = [], []
    for rank in range(2):
        ld = build_loader(cfg, 16, 4, "cpu", seed=0, rank=rank, world=2)
        counts.append(ld.batches_per_epoch)
        s = ld.stream(0)
        for _ in range(ld.batches_per_epoch):
            seen += _colour_index(next(s), cfg)
    assert counts[0] == counts[1] == 3  # 24 samples / (2 ranks x 4)
    assert sorted(seen) == list(range(24))


def test_training_reads_shards_and_resumes_bit_identically(tmp_path):
    from conftest import debug_cfg

    from engine.trainer import Trainer

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)).save(src / f"{i}.jpg")
    pack(str(src), str(tmp_path / "out"), per_shard=16, progress=False, log=lambda m: None)
    over = {"data.path": str(tmp_path / "out"), "train.batch_size": 8, "train.ckpt_every": 100}
    straight = Trainer(debug_cfg(tmp_path / "a", **over, **{"train.max_steps": 6}))
    assert straight.loader.num_samples == 40
    straight.fit()
    Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 3})).fit()
    resumed = Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 6}), resume=True)
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def _damage(out: Path, how: str) -> str:
    """Truncate the first shard mid-way, or corrupt one JPEG inside it; the damaged member's name."""
    shard = out / "shard-000000.tar"
    line = (out / "shard-000000.idx").read_text().splitlines()[3].split()
    off, size, member = int(line[1]), int(line[2]), line[3]
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(bytes(data[: off + size // 2]))
    else:
        data[off + 20: off + size] = b"\x00" * (size - 20)
        shard.write_bytes(bytes(data))
    return member


@pytest.mark.parametrize("how", ["truncated", "corrupt member"])
def test_torchvision_skips_a_damaged_member_naming_shard_and_member(tmp_path, capfd, how):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)).save(src / f"{i}.jpg")
    pack(str(src), str(tmp_path / "out"), per_shard=12, progress=False, log=lambda m: None)
    member = _damage(tmp_path / "out", how)
    ld = build_loader(DataConfig(path=str(tmp_path / "out"), backend="torchvision", num_workers=0), 16, 4, "cpu", 0)
    s = ld.stream(0)
    batches = [next(s) for _ in range(ld.batches_per_epoch)]
    assert all(torch.isfinite(b).all() for b in batches)
    lines = [x for x in capfd.readouterr().err.splitlines() if "skipping unreadable image" in x]
    assert any(f"shard-000000.tar:{member} (shard:member)" in x for x in lines)  # (truncated: those after it too)
    assert len(lines) == len(set(lines)) and (how == "truncated" or len(lines) == 1)  # each named once


@needs_dali
def test_dali_stops_on_a_corrupt_member_naming_shard_and_member(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)).save(src / f"{i}.jpg")
    pack(str(src), str(tmp_path / "out"), per_shard=12, progress=False, log=lambda m: None)
    member = _damage(tmp_path / "out", "corrupt member")
    ld = build_loader(DataConfig(path=str(tmp_path / "out"), backend="dali", num_workers=1), 16, 12, "cpu", 0)
    with pytest.raises(DataError, match=rf"shard-000000.tar:{member}"):
        next(ld.stream(0))


def test_a_manifest_with_missing_shards_is_named(tmp_path):
    src = _tree(tmp_path / "src")
    pack(str(src), str(tmp_path / "out"), per_shard=10, progress=False, log=lambda m: None)
    (tmp_path / "out" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="1 shard.* missing: shard-000001.tar"):
        open_shards(tmp_path / "out" / "manifest.json")


@needs_dali
def test_dali_resumes_packed_data_from_its_state(tmp_path):
    src = _tree(tmp_path / "src")
    pack(str(src), str(tmp_path / "out"), per_shard=7, progress=False, log=lambda m: None)
    cfg = DataConfig(path=str(tmp_path / "out"), backend="dali", num_workers=1)
    a = build_loader(cfg, 16, 4, "cpu", seed=1)
    s = a.stream(0)
    next(s), next(s)
    state = a.state_dict()
    want = [next(s) for _ in range(3)]
    b = build_loader(cfg, 16, 4, "cpu", seed=1)
    b.load_state_dict(state)
    s2 = b.stream(2)
    assert all(torch.equal(u, next(s2)) for u in want) and b.replayed == 0
