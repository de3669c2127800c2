"""Bad input gets one line naming the problem and a non-zero exit: absurd or mistyped architecture values (config
files, Hugging Face configs), files that are not config files, damaged shard manifests and indexes (DALI would crash
on an index past the end of its tar), read-only output directories, a full disk inside torch's writer, junk in a
checkpoint's fields; and data oddities handled: symlink loops, 16-bit PNGs, names with tabs and newlines, truncated
shards on a resumed pack."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.config import ConfigError, ModelConfig, debug

PRETRAIN = ["pretrain", "--train.device", "cpu", "--data.backend", "torchvision", "--data.num_workers", "0",
            "--train.tensorboard", "false", "--train.vis_every", "0", "--train.max_steps", "1"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("body,named", [
    ("[model]\ndepth = 99999999999999999999\n", "model.depth must be an integer in [1, 1024], got 99999999999999999999"),
    ("[model]\nimg_size = 1000000\n", "model.img_size must be an integer in [1, 16384], got 1000000"),
    ("[model]\nimg_size = 8192\npatch_size = 8\n", "makes 1048576 patches per image, over the limit of 65536"),
    ("[model]\nembed_dim = 32768\ndepth = 1024\nnum_heads = 64\n", "over the limit of 100B"),
    ("[model]\nmlp_ratio = 1e9\n", "model.mlp_ratio must be a number in (0, 64]"),
    ("[model]\ndepth = [1, 2]\n", "bad value '1,2' for --model.depth"),
    ("[model]\ndepth = {a = 1}\n", "model.depth is a table"),
    ("preset = 3\n", "preset must be a name"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply"),
])
def test_a_config_file_with_absurd_or_mistyped_values_is_one_line(tmp_path, capsys, body, named):
    f = tmp_path / "c.toml"
    f.write_text(body)
    assert main([*PRETRAIN, "--preset", "debug", "--config", str(f), "--run-dir", str(tmp_path / "r")]) == 2
    err = one_line(capsys)
    assert named in err, err
    assert not (tmp_path / "r").exists()


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_bytes(bytes(range(256)) * 4)
    assert main([*PRETRAIN, "--config", str(f), "--run-dir", str(tmp_path / "r")]) == 2
    assert f"config file {f} is not text" in one_line(capsys)


def test_the_parameter_estimate_matches_the_built_models():
    from engine.config import PRESETS
    from engine.model import build_model

    for name, make in PRESETS.items():
        m = make().model
        with torch.device("meta"):
            built = sum(p.numel() for p in build_model(m).parameters())
        assert abs(m.param_estimate() - built) / built < 0.01, name


def test_architecture_fields_are_typed_and_bounded():
    with pytest.raises(ConfigError, match=r"model.embed_dim must be an integer in \[1, 32768\], got '768' \(str\)"):
        ModelConfig(embed_dim="768")
    with pytest.raises(ConfigError, match=r"model.depth must be an integer .* got True \(bool\)"):
        ModelConfig(depth=True)
    ModelConfig(**{**debug().model.__dict__})  # the presets pass


def _hf_dir(tmp_path, config) -> Path:
    from engine.hf import export_hf
    from engine.model import build_model

    m = debug().model
    d = export_hf(build_model(m).state_dict(), m, tmp_path / "hf")
    (d / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return d


@pytest.mark.parametrize("change,named", [
    ({"num_hidden_layers": 1000000}, "model.depth must be an integer in [1, 1024], got 1000000"),
    ({"image_size": 1000000}, "model.img_size must be an integer in [1, 16384], got 1000000"),
    ({"hidden_size": "768"}, "hidden_size must be an integer, got '768' (str)"),
    ({"mask_ratio": "0.75"}, "mask_ratio must be a number, got '0.75' (str)"),
])
def test_a_hugging_face_config_with_absurd_or_mistyped_values_is_one_line(tmp_path, capsys, change, named):
    from engine.hf import hf_config

    c = {**hf_config(debug().model), **change}
    d = _hf_dir(tmp_path, c)
    assert main(["import", str(d), "--out", str(tmp_path / "o.pt")]) == 2
    err = one_line(capsys)
    assert named in err and str(d / "config.json") in err, err
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[" * 100000 + "]" * 100000])
def test_a_hugging_face_config_that_is_not_an_object_is_one_line(tmp_path, capsys, text):
    d = _hf_dir(tmp_path, text)
    assert main(["import", str(d), "--out", str(tmp_path / "o.pt")]) == 2
    assert str(d) in one_line(capsys)


# --- packed datasets: manifests and indexes -----------------------------------------------------------------------


@pytest.fixture
def packed(tmp_path) -> Path:
    from pipelines.shards import pack

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    out = tmp_path / "packed"
    pack(str(src), str(out), per_shard=4, progress=False, log=lambda m: None)
    return out


def _edit_manifest(packed: Path, edit) -> None:
    m = json.loads((packed / "manifest.json").read_text())
    m = edit(m)
    (packed / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,named", [
    (lambda m: [m], "is not a manifest of `mae data pack`"),
    (lambda m: {**m, "shards": [None] + m["shards"][1:]}, "shard 0 is None"),
    (lambda m: {**m, "shards": [{k: v for k, v in s.items() if k != "index"} for s in m["shards"]]},
     "shard 0 has no index"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "name": "../../etc/passwd"}] + m["shards"][1:]},
     "is outside the manifest's directory"),
    (lambda m: {**m, "samples": "12"}, "samples must be a whole number"),
])
def test_a_damaged_manifest_is_one_line_in_training_and_in_data_check(packed, tmp_path, capsys, edit, named):
    _edit_manifest(packed, edit)
    assert main([*PRETRAIN, "--preset", "debug", "--data", str(packed), "--run-dir", str(tmp_path / "r")]) == 2
    assert named in one_line(capsys)
    assert main(["data", "check", str(packed)]) == 2
    assert named in one_line(capsys)


@pytest.mark.parametrize("damage", ["offset past the end", "truncated tar"])
def test_an_index_past_the_end_of_its_tar_is_named_before_dali_opens_it(packed, tmp_path, capsys, damage):
    """DALI crashed (exit 139, no message) on such an index: it is refused in one line naming the entry; the
    torchvision backend skips those members with a warning each; `mae data check` lists them and exits 1."""
    idx = packed / "shard-000001.idx"
    tar = packed / "shard-000001.tar"
    lines = idx.read_text().splitlines()
    if damage == "truncated tar":
        tar.write_bytes(tar.read_bytes()[:1500])
    else:
        parts = lines[2].split()
        parts[1] = str(tar.stat().st_size + 4096)
        lines[2] = " ".join(parts)
        idx.write_text("\n".join(lines) + "\n")
    assert main([*PRETRAIN, "--preset", "debug", "--data", str(packed), "--run-dir", str(tmp_path / "dali"),
                 "--data.backend", "dali"]) == 2
    err = one_line(capsys)
    assert "lies outside" in err and str(idx) in err and "--data.backend torchvision" in err, err
    assert main([*PRETRAIN, "--preset", "debug", "--data", str(packed), "--run-dir", str(tmp_path / "tv"),
                 "--train.batch_size", "4", "--train.max_steps", "3"]) == 0  # one epoch: every member
    assert "skipping unreadable image" in capsys.readouterr().err
    assert main(["data", "check", str(packed)]) == 1
    assert "BAD " + str(idx) in capsys.readouterr().out


def test_a_damaged_index_line_is_one_line(packed, tmp_path, capsys):
    idx = packed / "shard-000001.idx"
    lines = idx.read_text().splitlines()
    parts = lines[2].split()
    parts[1] = "12x"
    lines[2] = " ".join(parts)
    idx.write_text("\n".join(lines) + "\n")
    for backend in ("torchvision", "dali"):
        assert main([*PRETRAIN, "--preset", "debug", "--data", str(packed), "--run-dir", str(tmp_path / backend),
                     "--data.backend", backend]) == 2
        err = one_line(capsys)
        assert "must be whole numbers" in err and str(idx) in err, err


def test_a_resumed_pack_rewrites_a_truncated_finished_shard(tmp_path):
    from pipelines.shards import PARTIAL, open_shards, pack

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(src / f"{i}.png")
    out = tmp_path / "out"
    m = pack(str(src), str(out), per_shard=4, progress=False, log=lambda x: None)
    good = (out / "shard-000000.tar").read_bytes()
    # a pack killed after shard 0: its partial record, and shard 0 cut short by a lost write-back
    (out / PARTIAL).write_text(json.dumps({"settings": {"source": str(src.resolve()), "seed": 0, "shard_bytes": None,
                                                        "per_shard": 4, "labels": False, "files": 8},
                                           "shards": m["shards"][:1]}))
    (out / "shard-000000.tar").write_bytes(good[:700])
    pack(str(src), str(out), per_shard=4, progress=False, log=lambda x: None)
    assert (out / "shard-000000.tar").read_bytes() == good
    assert len(open_shards(out)) == 8


def test_data_commands_into_a_read_only_directory_are_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        ro = Path("/proc/self")  # root ignores permission bits: a directory no one can write to
    else:  # pragma: no cover - CI runs as root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20)).save(src / "a.png")
    assert main(["data", "check", str(src), "--out", str(ro / "q.jsonl")]) == 2
    assert "cannot write or read" in one_line(capsys)
    assert main(["data", "pack", str(src), str(ro / "packed"), "--per-shard", "4"]) == 2
    assert "cannot write or read" in one_line(capsys)


# --- data oddities ---------------------------------------------------------------------------------------------


def test_a_symlink_loop_does_not_multiply_the_data_set(tmp_path):
    from pipelines.check import scan
    from pipelines.common import list_images

    d = tmp_path / "data"
    (d / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(d / "a" / f"{i}.png")
    (d / "a" / "loop").symlink_to(d)  # a link back up the tree
    (d / "again").symlink_to(d / "a")  # two names for one folder
    (d / "b.png").symlink_to(d / "a" / "0.png")  # two names for one file
    images, _ = list_images(str(d))
    assert len(images) == 4
    assert len(scan(str(d))) == 4


def test_a_16_bit_png_is_scaled_not_clipped_and_noted(tmp_path):
    from pipelines.check import check_file
    from pipelines.common import to_rgb

    a = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    want = np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], want) and np.array_equal(rgb[..., 2], want)
    assert (rgb == 255).mean() < 0.01  # PIL's own convert("RGB") makes nearly every pixel white
    f = check_file(str(p))
    assert f.kind == "grayscale" and "16-bit" in f.detail and "scales it to 8 bits" in f.detail


def test_names_with_tabs_and_newlines_survive_the_quarantine_list(tmp_path):
    from pipelines.check import scan, write_quarantine
    from pipelines.common import list_images, read_quarantine

    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "good.png")
    for name in ("tab\there.png", "new\nline.png", "both\t\n.png"):
        (d / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)  # a damaged PNG
    q = tmp_path / "q.jsonl"
    assert write_quarantine(scan(str(d)), str(q)) == 3
    assert read_quarantine(q) == {str(d / n) for n in ("tab\there.png", "new\nline.png", "both\t\n.png")}
    assert list_images(str(d), str(q))[0] == [str(d / "good.png")]
    old = tmp_path / "old.txt"  # the earlier format still reads
    old.write_text(f"# comment\n{d / 'good.png'}\tcorrupt: x\n")
    assert read_quarantine(old) == {str(d / "good.png")}


# --- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    assert main([*PRETRAIN, "--preset", "debug", "--run-dir", str(d), "--train.max_steps", "2"]) == 0
    return d


@pytest.mark.parametrize("field,value,named", [
    ("step", "12", "step is '12' (str), expected a whole number"),
    ("step", -3, "step is -3"),
    ("rng", {"torch": "junk"}, "rng is"),
    ("data", [1, 2], "data is [1, 2]"),
    ("config", "junk", "config is 'junk' (str)"),
    ("world", 0, "world is 0"),
])
def test_checkpoint_fields_of_the_wrong_type_are_one_line(trained, tmp_path, capsys, field, value, named):
    import shutil

    from engine import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    p = ckpt.latest_checkpoint(run)
    obj = ckpt.load_checkpoint(p)
    obj[field] = value
    torch.save(obj, p)
    before = (run / "config.toml").read_bytes()
    assert main([*PRETRAIN, "--preset", "debug", "--run-dir", str(run), "--resume", "--train.max_steps", "4"]) == 2
    err = one_line(capsys)
    assert named in err and str(p) in err, err
    assert (run / "config.toml").read_bytes() == before


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_eval_on_a_damaged_checkpoint_names_the_damage_not_a_missing_config(trained, tmp_path, capsys, damage):
    from engine import checkpoint as ckpt

    p = tmp_path / "c.pt"
    data = ckpt.latest_checkpoint(trained).read_bytes()
    p.write_bytes(b"not a checkpoint at all" if damage == "garbage" else data[: len(data) // 2])
    assert main(["eval", "knn", "--checkpoint", str(p), "--train", str(tmp_path), "--val", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert "carries no config" not in err and str(p) in err and ("damaged" in err or "not a PyTorch" in err), err


def test_a_full_disk_inside_torchs_zip_writer_is_one_line(tmp_path, monkeypatch):
    from engine import checkpoint as ckpt

    def full(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1024")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write ckpt_00000001.pt in {tmp_path}: .*intact"):
        ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(1)})
    assert not list(tmp_path.iterdir())
