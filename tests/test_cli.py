"""The `mae` command line: happy paths and every error path ends in one message and a non-zero exit."""

import subprocess
import sys

from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.cli import main

FAST = ["--data.num_workers", "0", "--train.tensorboard", "false", "--train.device", "cpu",
        "--data.backend", "torchvision"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--preset", "debug", "--run-dir", str(d), "--train.max_steps", "3", *FAST]) == 0
    return d


def test_pretrain_prints_effective_batch_and_lr(tmp_path, capsys):
    code, out, err = run(["pretrain", "--run-dir", str(tmp_path), "--train.max_steps", "2", "--train.batch_size",
                          "16", "--train.accum_steps", "2", *FAST], capsys)
    assert code == 0, err
    assert "effective batch 32 = 16 per device x 2 accumulation x 1 rank(s)" in out
    assert "lr 0.00125 = base 0.01 x 32/256" in out
    assert (tmp_path / "ckpt_00000002.pt").is_file()


def test_resume_flag(trained, capsys):
    code, out, err = run(["pretrain", "--run-dir", str(trained), "--resume", "--train.max_steps", "4", *FAST], capsys)
    assert code == 0, err
    assert "resumed from" in out and "at step 3" in out


def test_export_and_visualize(trained, tmp_path, capsys):
    ck = str(sorted(trained.glob("ckpt_*.pt"))[-1])
    code, out, err = run(["export", ck, "--out", str(tmp_path / "enc.pth")], capsys)
    assert code == 0, err
    enc = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert "blocks.0.attn.qkv.weight" in enc and not any(k.startswith("decoder") for k in enc)
    code, out, err = run(["export", ck, "--what", "full", "--out", str(tmp_path / "full.pth")], capsys)
    assert code == 0 and "decoder_pred.weight" in torch.load(tmp_path / "full.pth", weights_only=True)["model"]
    img = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    code, out, err = run(["visualize", ck, str(img), str(img), "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    g = Image.open(tmp_path / "g.png")
    assert g.width > 5 * g.height / 2  # six columns per row (engine.visualize.COLUMNS), two rows
    code, out, err = run(["visualize", ck, str(img)], capsys)  # no --out: beside the checkpoint, in its run's recon/
    default = Path(ck).parent / "recon" / f"visualize_{Path(ck).stem}.png"
    assert code == 0 and default.is_file() and str(default) in out, (out, err)


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "--data", "/no/such/dir"], "data directory /no/such/dir does not exist"),
    (["pretrain", "--preset", "vit-z"], "unknown preset 'vit-z'"),
    (["pretrain", "--optim.lrr", "1"], "unknown option --optim.lrr"),
    (["pretrain", "--model.mask_ratio", "1.0"], "mask ratio must be in [0, 1), got 1.0"),
    (["pretrain", "--train.batch_size"], "option --train.batch_size needs a value"),
    (["pretrain", "stray"], "unexpected argument 'stray'"),
    (["pretrain", "--preset", "debug", "--train.device", "cpu", "--train.cuda_graph", "true"],
     "train.cuda_graph=true: it needs CUDA"),
    (["pretrain", "--preset", "debug", "--train.checkpoint_blocks", "5"], "more than the encoder's 2 blocks"),
    (["pretrain", "--train.attention", "fastest"], "train.attention must be auto, flash"),
    (["visualize", "/no/ckpt.pt", "x.png"], "checkpoint /no/ckpt.pt does not exist"),
    (["export", "/no/ckpt.pt", "--out", "x.pth"], "checkpoint /no/ckpt.pt does not exist"),
])
def test_error_paths(argv, needle, capsys, tmp_path):
    if argv[0] == "pretrain":
        argv = argv + ["--run-dir", str(tmp_path / "r")]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("ckpt_*"))


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hi")
    code, _, err = run(["pretrain", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2 and f"no images found in {tmp_path / 'data'}" in err


def test_resume_with_other_architecture(trained, capsys, tmp_path):
    code, out, err = run(["pretrain", "--run-dir", str(trained), "--resume", "--model.embed_dim", "128", *FAST],
                         capsys)
    assert code == 2
    assert "is of another architecture" in err and "embed_dim: checkpoint 64 vs config 128" in err


def test_visualize_other_architecture_checkpoint(trained, tmp_path, capsys):
    ck = str(sorted(trained.glob("ckpt_*.pt"))[-1])
    code, _, err = run(["visualize", ck, "x.png", "--preset", "tiny"], capsys)
    assert code == 2 and "does not fit this model" in err and "shape mismatch" in err


def test_console_script_help_and_error(capsys):
    r = subprocess.run([sys.executable, "-m", "engine.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: mae pretrain" in r.stdout
    from engine.cli import main

    for sub in ("visualize", "export"):  # in this process (each subprocess costs seconds of imports)
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0 and "usage: mae " + sub in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "engine.cli", "pretrain", "--model.mask_ratio", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "mask ratio must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
