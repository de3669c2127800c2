"""Checkpoints never run code and fail with one clear line: sharded (DCP) checkpoints whose `.metadata` or values are
code-running pickles, in every command that reads one; damaged sharded checkpoints; stale temporary files of killed
writers; full disks and read-only run directories; permissions that follow the umask."""

import errno
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import debug_cfg

from engine import checkpoint as ckpt
from engine.cli import main


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sharded_checkpoint(tmp_path, step=4) -> Path:
    """A real ckpt_XXXXXXXX.dcp/ of a short debug run (DCP written by one process), with its meta.pt."""
    import torch.distributed.checkpoint as dcp

    from engine.trainer import Trainer

    t = Trainer(debug_cfg(tmp_path / "src", **{"train.max_steps": step, "train.ckpt_every": 100}), log=lambda m: None)
    t.fit()
    d = tmp_path / "run" / f"ckpt_{step:08d}.dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving from one process"
        dcp.save(ckpt.training_state(t.model, t.optimizer), checkpoint_id=str(d))
    ckpt.atomic_torch_save(t.meta(), d / "meta.pt")
    return d


@pytest.fixture(scope="module")
def evil_dcp(tmp_path_factory):
    """A sharded checkpoint whose .metadata, once unpickled, runs `touch <marker>`."""
    tmp = tmp_path_factory.mktemp("evil")
    d = _sharded_checkpoint(tmp)
    marker = tmp / "PWNED"
    (d / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return d, marker


@pytest.mark.parametrize("command", ["resume", "visualize", "export", "import", "knn"])
def test_a_code_running_dcp_metadata_is_refused_by_every_command(evil_dcp, tmp_path, capsys, command):
    d, marker = evil_dcp
    run_dir = d.parent
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (90, 10, 200)).save(img)
    digits = tmp_path / "digits"
    if command == "knn":
        from pipelines.labelled import export_digits

        export_digits(str(digits), 32)
    argv = {
        "resume": ["pretrain", "--preset", "debug", "--run-dir", str(run_dir), "--resume", "--train.device", "cpu",
                   "--data.backend", "torchvision", "--data.num_workers", "0", "--train.max_steps", "6"],
        "visualize": ["visualize", str(d), str(img), "--out", str(tmp_path / "g.png")],
        "export": ["export", str(d), "--out", str(tmp_path / "e.pth")],
        "import": ["import", str(d), "--preset", "debug", "--out", str(tmp_path / "i.pt")],
        "knn": ["eval", "knn", "--checkpoint", str(d), "--train", str(digits / "train"), "--val", str(digits / "val")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"refused {d}" in err and "posix.system" in err and "nothing in them is run" in err, err
    assert "Traceback" not in err and not marker.exists()
    assert not list(tmp_path.glob("*.p*t*")) or command == "resume"  # nothing written


def test_a_code_running_value_inside_a_shard_is_refused(tmp_path):
    """DCP loads a checkpoint's non-tensor values with torch.load(weights_only=False): here weights-only."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "note": Payload(marker)}, checkpoint_id=str(tmp_path / "c.dcp"))
        state = {"w": torch.zeros(2), "note": None}
        with pytest.raises(ckpt.CheckpointError, match="refused .*c.dcp: it asks to call or build posix.system"):
            ckpt.load_sharded(tmp_path / "c.dcp", state)
    assert not marker.exists()


def test_a_legitimate_sharded_checkpoint_still_loads(tmp_path):
    d = _sharded_checkpoint(tmp_path)
    sd = ckpt.full_model_state(d)
    assert "decoder_pred.weight" in sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    from engine.trainer import Trainer

    t = Trainer(debug_cfg(d.parent, **{"train.max_steps": 6}), resume=True, log=lambda m: None)
    assert t.step == 4


@pytest.mark.parametrize("damage", ["truncated shard", "garbage metadata", "missing shard"])
def test_a_damaged_sharded_checkpoint_is_one_clear_line(tmp_path, capsys, damage):
    d = _sharded_checkpoint(tmp_path)
    shard = next(d.glob("*.distcp"))
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    elif damage == "garbage metadata":
        (d / ".metadata").write_bytes(b"\x80\x04 this is not a pickle")
    else:
        shard.unlink()
    assert main(["pretrain", "--preset", "debug", "--run-dir", str(d.parent), "--resume", "--train.device", "cpu",
                 "--data.backend", "torchvision", "--data.num_workers", "0", "--train.max_steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(d) in err and ("damaged" in err or "refused" in err), err
    assert len(err.strip().splitlines()) == 1, err


# --- temporary files, full disks, read-only directories, permissions -----------------------------------------


def test_stale_temp_files_of_dead_writers_are_removed_never_a_live_ones(tmp_path):
    import socket
    import subprocess
    import sys

    host = socket.gethostname().replace(".", "-")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".ckpt_00000010.pt.{host}-{dead}.abc123.tmp"
    live = tmp_path / f".ckpt_00000020.pt.{host}-{os.getpid()}.def456.tmp"
    other_host_recent = tmp_path / ".ckpt_00000030.pt.elsewhere-42.xyz.tmp"
    stale_dir = tmp_path / ".ckpt_00000040.dcp.tmp"
    stale_dir.mkdir()
    (stale_dir / ".writer").write_text(f"{host} {dead}\n")
    for p in (stale, live, other_host_recent):
        p.write_bytes(b"x" * 100)
    keep = tmp_path / "ckpt_00000005.pt"
    keep.write_bytes(b"a checkpoint")
    removed = ckpt.remove_stale_temp_files(tmp_path)
    assert set(removed) == {stale, stale_dir}
    assert live.exists() and other_host_recent.exists() and keep.exists()


def test_a_run_removes_its_stale_temp_files_at_start(tmp_path):
    from engine.trainer import Trainer

    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    junk = tmp_path / f".ckpt_00000003.pt.{socket.gethostname().replace('.', '-')}-{dead}.q1w2e3.tmp"
    tmp_path.mkdir(exist_ok=True)
    junk.write_bytes(b"x" * 1000)
    Trainer(debug_cfg(tmp_path, **{"train.max_steps": 1}), log=lambda m: None)
    assert not junk.exists()


def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The writer fails with ENOSPC (a patched write: a real quota needs root): exit 2 with the directory named,
    the checkpoint written before intact, no temp file left."""
    args = ["pretrain", "--preset", "debug", "--run-dir", str(tmp_path), "--train.device", "cpu", "--data.backend",
            "torchvision", "--data.num_workers", "0", "--train.tensorboard", "false", "--train.ckpt_every", "2",
            "--train.vis_every", "0", "--train.log_every", "2"]
    assert main(args + ["--train.max_steps", "2"]) == 0
    first = ckpt.latest_checkpoint(tmp_path)
    real_save = torch.save

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert main(args + ["--train.max_steps", "4", "--resume"]) == 2
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert f"cannot write ckpt_00000004.pt in {tmp_path}: no space left on the device" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(tmp_path) == first and ckpt.load_checkpoint(first)["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _pretrain(run_dir):
    return main(["pretrain", "--preset", "debug", "--run-dir", str(run_dir), "--train.device", "cpu",
                 "--train.max_steps", "1", "--data.num_workers", "0", "--train.tensorboard", "false"])


def test_read_only_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only file system (simulated: root may write anywhere) and a run directory under a regular file
    both stop the run before any work, in one line naming the directory."""
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if ".mae_write_probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    assert _pretrain(tmp_path / "ro") == 2
    err = capsys.readouterr().err
    assert f"in {tmp_path / 'ro'}: the file system is read-only" in err and "Traceback" not in err
    monkeypatch.setattr(os, "open", real_open)
    (tmp_path / "afile").write_text("x")
    assert _pretrain(tmp_path / "afile" / "run") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "afile" / "run") in err and "not a directory" in err and "Traceback" not in err


def test_read_only_file_system_error_names_the_directory(tmp_path):
    e = ckpt.io_error(OSError(errno.EROFS, "Read-only file system"), "ckpt_00000001.pt", tmp_path)
    assert str(e) == (f"cannot write ckpt_00000001.pt in {tmp_path}: the file system is read-only; the checkpoints "
                      "already there are intact")


def test_checkpoints_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = ckpt.atomic_torch_save({"w": torch.ones(1)}, tmp_path / "ckpt_00000001.pt")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644  # readable by teammates, as any new file under this umask


KILL_CHILD = r"""
import os, signal, sys
import torch
from engine import checkpoint as ckpt
d, form, where = sys.argv[1], sys.argv[2], sys.argv[3]

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

if form == "pt":
    ckpt.save_checkpoint(d, 1, {"w": torch.ones(3)})
    real = torch.save
    def dying(obj, f, *a, **k):
        f.write(b"partial" * 1000)
        f.flush()
        die()
    torch.save = dying
    ckpt.save_checkpoint(d, 2, {"w": torch.zeros(3)})
else:  # sharded: a one-rank process group, the same code path as every rank of a torchrun job
    import torch.distributed as dist
    from engine.parallel import _free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt.save_training_checkpoint(d, 1, model, opt, {"step": 1}, keep_last=3, sharded=True)
    if where == "rename":  # the shards and meta.pt are written; killed before the directory is renamed in
        real_replace = os.replace
        os.replace = lambda src, dst: die() if str(src).endswith(".dcp.tmp") else real_replace(src, dst)
    else:  # killed while meta.pt is being written
        def dying(obj, f, *a, **k):
            f.write(b"partial")
            f.flush()
            die()
        torch.save = dying
    ckpt.save_training_checkpoint(d, 2, model, opt, {"step": 2}, keep_last=3, sharded=True)
"""


@pytest.mark.parametrize("form,where", [("pt", "write"), ("dcp", "rename"), ("dcp", "meta")])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, form, where):
    """SIGKILL (no cleanup runs) in the middle of a save: the checkpoint before it is still the newest and loads;
    the partial files are temporary ones that the next run removes (their writer is dead)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path), form, where], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == -9, r.stderr[-2000:]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == f"ckpt_00000001.{form}"
    assert ckpt.read_meta(latest)["step"] == 1 if form == "dcp" else torch.equal(
        ckpt.load_checkpoint(latest)["w"], torch.ones(3))
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and set(ckpt.remove_stale_temp_files(tmp_path)) == set(leftovers)
