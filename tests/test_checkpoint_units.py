"""engine/checkpoint.py function by function, in this process and in well under a second each: the newest K kept,
the listing order, the round trip of a training checkpoint in both forms (a one-rank gloo group for the sharded one),
the resume fields' checks and their messages, the RNG capture, the weights' origins. The end-to-end behaviour (kills,
full disks, payloads, every command) is in test_checkpoint_safety.py and test_dcp_payloads.py; this file is what the
mutation run (tools/mutation.py) holds each planted change of checkpoint.py against."""

import os
import socket
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import checkpoint as ckpt
from engine.atomic import CheckpointError
from engine.config import debug
from engine.model import build_model


def _touch_ckpt(d, step, form):
    p = ckpt.checkpoint_path(d, step, sharded=form == "dcp")
    if form == "dcp":
        p.mkdir()
        (p / "shard").write_bytes(b"x")
    else:
        p.write_bytes(b"x")
    return p


# --- names, listing, pruning


def test_checkpoint_names_and_listing_order(tmp_path):
    assert ckpt.checkpoint_path(tmp_path, 7) == tmp_path / "ckpt_00000007.pt"
    assert ckpt.checkpoint_path(tmp_path, 23456789, sharded=True) == tmp_path / "ckpt_23456789.dcp"
    assert ckpt.checkpoint_path(tmp_path, 123456789) == tmp_path / "ckpt_123456789.pt"  # past 10^8: a ninth digit
    assert ckpt.list_checkpoints(tmp_path / "absent") == [] and ckpt.latest_checkpoint(tmp_path) is None
    for step, form in [(10, "pt"), (9, "pt"), (100, "dcp"), (10, "dcp"), (2, "pt")]:
        _touch_ckpt(tmp_path, step, form)
    for junk in ("ckpt_1.pt", "ckpt_00000050.pt.tmp", ".ckpt_00000060.pt", "ckpt_00000070.pth", "xckpt_00000080.pt",
                 "ckpt_000000090.pt"):
        (tmp_path / junk).write_bytes(b"x")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt_00000002.pt", "ckpt_00000009.pt", "ckpt_00000010.dcp", "ckpt_00000010.pt",
                     "ckpt_00000100.dcp"]  # by step as a number, then .dcp before .pt
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt_00000100.dcp"
    for step in (10**8, 99_999_999, 10**9):  # a ninth and tenth digit: still by number, not by name
        _touch_ckpt(tmp_path, step, "pt")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names[-3:] == ["ckpt_99999999.pt", "ckpt_100000000.pt", "ckpt_1000000000.pt"] and len(names) == 8
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt_1000000000.pt"


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 10**10), st.sampled_from(["pt", "dcp"])), unique=True,
                      max_size=8),
       keep=st.integers(1, 6))
def test_pruning_keeps_exactly_the_newest_k(tmp_path_factory, steps, keep):
    d = tmp_path_factory.mktemp("prune")
    for step, form in steps:
        _touch_ckpt(d, step, form)
    (d / "metrics.jsonl").write_text("{}")
    ckpt.prune(d, keep)
    newest = sorted(steps, key=lambda s: (s[0], "." + s[1]))[-keep:]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [ckpt.checkpoint_path(d, s, f == "dcp").name for s, f in newest] + ["metrics.jsonl"])


def test_save_checkpoint_keeps_three_by_default_and_the_file_loads(tmp_path):
    for step in range(1, 6):
        p = ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))})
    assert p == tmp_path / "ckpt_00000005.pt"
    assert [q.name for q in ckpt.list_checkpoints(tmp_path)] == [f"ckpt_0000000{s}.pt" for s in (3, 4, 5)]
    assert torch.equal(ckpt.load_checkpoint(p)["w"], torch.full((2,), 5.0))


# --- the run directory: writable, stale temporary files


def test_ensure_writable_creates_the_directory_and_leaves_no_probe(tmp_path):
    d = ckpt.ensure_writable(tmp_path / "a" / "b")
    assert d == tmp_path / "a" / "b" and d.is_dir() and list(d.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError) as e:
        ckpt.ensure_writable(tmp_path / "file" / "run")
    assert str(e.value) == (f"cannot write the run's files in {tmp_path / 'file' / 'run'}: a part of the path is a "
                            "file, not a directory; the checkpoints already there are intact")


def _aged(p, seconds):
    t = time.time() - seconds
    os.utime(p, (t, t))
    return p


def test_stale_temporary_files_by_writer_and_age(tmp_path):
    host = socket.gethostname().replace(".", "-")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    assert not ckpt._pid_alive(dead) and ckpt._pid_alive(os.getpid()) and ckpt._pid_alive(1)
    files = {  # name -> (age in seconds, stale under the default hour)
        f".ckpt_00000002.pt.{host}-{dead}.ab12.tmp": (0, True),  # this host, writer gone: at once
        f".ckpt_00000003.pt.{host}-{os.getpid()}.cd34.tmp": (7200, False),  # writer alive: never
        f".ckpt_00000004.pt.elsewhere-{dead}.ef56.tmp": (7200, True),  # another host: by age
        f".ckpt_00000005.pt.elsewhere-{dead}.gh78.tmp": (1800, False),
        ".something.tmp": (7200, True),  # untagged: by age
        "ckpt_00000006.pt.tmp": (7200, False),  # not hidden: not ours
        ".ckpt_00000007.pt": (7200, False),  # not .tmp
    }
    dirs = {  # a sharded save's temporary directory, its writer in .writer
        ".ckpt_00000008.dcp.tmp": (f"{host} {dead}\n", 0, True),
        ".ckpt_00000009.dcp.tmp": (f"{host} {os.getpid()}\n", 7200, False),
        ".ckpt_00000010.dcp.tmp": ("no-pid-here\n", 0, False),  # unreadable: the age rule, and it is fresh
    }
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"x")
        _aged(tmp_path / name, age)
    for name, (writer, age, _) in dirs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / ".writer").write_text(writer)
        _aged(tmp_path / name, age)
    want = {tmp_path / n for n, (_, stale) in files.items() if stale} | {
        tmp_path / n for n, (_, _, stale) in dirs.items() if stale}
    assert set(ckpt.remove_stale_temp_files(tmp_path)) == want
    assert {p for p in tmp_path.iterdir()} == {tmp_path / n for n in [*files, *dirs]} - want
    assert set(ckpt.remove_stale_temp_files(tmp_path, min_age_s=60)) == {
        tmp_path / f".ckpt_00000005.pt.elsewhere-{dead}.gh78.tmp"}
    assert set(ckpt.remove_stale_temp_files(tmp_path, min_age_s=-1)) == {tmp_path / ".ckpt_00000010.dcp.tmp"}
    assert ckpt.remove_stale_temp_files(tmp_path / "absent") == []


class _RanksFailed(BaseException):
    """Stands in for DCP's CheckpointException: {rank: (exception, traceback)}, deriving from BaseException."""

    def __init__(self, failures):
        super().__init__("ranks failed")
        self.failures = failures


# --- a training checkpoint's round trip, both forms


def _trained(seed=0):
    torch.manual_seed(seed)
    model = build_model(debug().model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _, _ = model(torch.randn(2, 3, 32, 32), 0.75)
    loss.backward()
    opt.step()
    return model, opt


def _assert_same_training_state(a, b):
    (ma, oa), (mb, ob) = a, b
    for (k, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(x, y), k
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_a_file_checkpoint_round_trips_model_optimizer_and_meta(tmp_path):
    src = _trained(0)
    meta = {"step": 3, "data": {"micro_batch": 3}, "config": {"model": {"depth": debug().model.depth}}}
    p = ckpt.save_training_checkpoint(tmp_path, 3, *src, meta, keep_last=2, sharded=False)
    assert p == tmp_path / "ckpt_00000003.pt"
    dst = _trained(1)
    assert ckpt.load_training_checkpoint(p, *dst, model_cfg=debug().model) == meta
    _assert_same_training_state(src, dst)
    assert ckpt.read_meta(p) == meta
    other = debug().model
    other.depth += 1
    with pytest.raises(CheckpointError, match=rf"is of another architecture \(depth: checkpoint {other.depth - 1} vs "
                                              rf"config {other.depth}\)"):
        ckpt.load_training_checkpoint(p, *dst, model_cfg=other)
    for k in range(4, 7):
        ckpt.save_training_checkpoint(tmp_path, k, *src, {**meta, "step": k}, keep_last=2, sharded=False)
    assert [q.name for q in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000005.pt", "ckpt_00000006.pt"]
    weights = ckpt.atomic_torch_save({"model": src[0].state_dict(), "step": 1}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_training_checkpoint(weights, *dst)
    assert str(e.value) == (f"{weights} is not a training checkpoint (no optimizer state); to start from weights "
                            "only, use a new run directory")


def test_a_sharded_checkpoint_round_trips_and_is_renamed_in_whole(tmp_path, one_rank_group):
    src = _trained(0)
    meta = {"step": 2, "data": {"micro_batch": 2}}
    p = ckpt.save_training_checkpoint(tmp_path, 2, *src, meta, keep_last=1, sharded=True)
    assert p == tmp_path / "ckpt_00000002.dcp" and p.is_dir() and (p / ".metadata").is_file()
    assert not (p / ".writer").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["ckpt_00000002.dcp"]
    assert ckpt.read_meta(p) == meta
    dst = _trained(1)
    assert ckpt.load_training_checkpoint(p, *dst) == meta
    _assert_same_training_state(src, dst)
    full = ckpt.full_model_state(p)
    assert full.keys() == src[0].state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in src[0].state_dict().items())
    again = ckpt.save_training_checkpoint(tmp_path, 2, *dst, {"step": 2, "again": True}, keep_last=1, sharded=True)
    assert again == p and ckpt.read_meta(p)["again"] is True  # a save over the same step replaces it whole
    ckpt.save_training_checkpoint(tmp_path, 5, *dst, {"step": 5}, keep_last=1, sharded=True)
    assert [q.name for q in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000005.dcp"]
    (tmp_path / "blocked").write_text("x")
    with pytest.raises(CheckpointError) as e:  # rank 0 cannot make the directory: every rank raises, none waits
        ckpt.save_training_checkpoint(tmp_path / "blocked", 6, *dst, {"step": 6}, keep_last=1, sharded=True)
    assert str(e.value) == (f"cannot write ckpt_00000006.dcp in {tmp_path / 'blocked'}: a file of that name is in "
                            "the way; the checkpoints already there are intact")
    with pytest.raises(CheckpointError) as e:  # a rank other than 0 learns of rank 0's failure
        ckpt._raise_together(None, p, tmp_path) or ckpt._raise_together(CheckpointError("rank 0"), p, tmp_path)
    assert str(e.value) == "rank 0"


def test_the_os_error_behind_a_wrapped_failure_is_found():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    assert ckpt._first_os_error(full) is full
    assert ckpt._first_os_error(ValueError("x")) is None and ckpt._first_os_error(OSError("no errno")) is None
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert ckpt._first_os_error(e) is full
    try:
        try:
            raise full
        except OSError:
            raise KeyError("during handling")  # noqa: B904 - the context, not the cause
    except KeyError as e:
        assert ckpt._first_os_error(e) is full

    assert ckpt._first_os_error(_RanksFailed({0: (ValueError("a"), None), 1: (full, None)})) is full
    assert ckpt._first_os_error(_RanksFailed({3: full})) is full
    loop = RuntimeError("loop")
    loop.__context__ = loop
    assert ckpt._first_os_error(loop) is None


# --- reading: files, keys, architecture, fields


def test_loading_names_what_is_wrong_with_the_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    assert str(e.value) == f"checkpoint {tmp_path / 'nope.pt'} does not exist"
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path / "list.pt")
    assert str(e.value) == f"checkpoint {tmp_path / 'list.pt'} holds a list, not a dict of tensors"
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*text\.pt: not a PyTorch checkpoint, or "
                                              r"damaged \(\w+: "):
        ckpt.load_checkpoint(tmp_path / "text.pt")
    (tmp_path / "empty.dcp").mkdir()
    with pytest.raises(CheckpointError) as e:
        ckpt.full_model_state(tmp_path / "empty.dcp")
    assert str(e.value) == (f"{tmp_path / 'empty.dcp'} is not a checkpoint (no .pt file, no DCP .metadata, no Hugging "
                            "Face config.json)")


def test_model_state_is_found_in_every_layout():
    sd = {"a": torch.ones(1)}
    assert ckpt.model_state_from({"model": sd, "step": 1}, "c.pt") is sd and ckpt.model_state_from(sd, "c.pt") is sd
    for bad in ({"model": {"a": 1}}, {"model": [torch.ones(1)]}, {"a": torch.ones(1), "step": 3}):
        with pytest.raises(CheckpointError) as e:
            ckpt.model_state_from(bad, "x.pt")
        assert str(e.value) == "x.pt holds no model state dict"
    assert ckpt.model_state_from({}, "c.pt") == {}


def test_key_mismatches_are_listed_in_one_message():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.load_model_state(model, sd, "m.pt")  # exact: loads
    sd.pop("0.bias")
    sd["extra"] = torch.ones(1)
    sd["1.weight"] = torch.ones(2, 3)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_model_state(model, sd, "m.pt")
    assert str(e.value) == ("checkpoint m.pt does not fit this model: missing (1): 0.bias; unexpected (1): extra; "
                            "shape mismatch (1): 1.weight: checkpoint (2, 3) vs model (1, 3)")
    many = ckpt._mismatch_message("m.pt", [f"k{i}" for i in range(9)], [], [])
    assert many == "checkpoint m.pt does not fit this model: missing (9): k0, k1, k2, k3, k4, k5, k6, k7 ..."
    assert ckpt._mismatch_message("m.pt", [f"k{i}" for i in range(8)], [], []).endswith("k6, k7")


def test_architecture_check_names_each_difference():
    cfg = debug().model
    ckpt.check_architecture(None, cfg, "c.pt")
    ckpt.check_architecture({"model": "?"}, cfg, "c.pt")
    ckpt.check_architecture({"model": {"depth": cfg.depth, "lr": 5}}, cfg, "c.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt.check_architecture({"model": {"embed_dim": cfg.embed_dim * 2, "patch_size": cfg.patch_size,
                                           "decoder_depth": cfg.decoder_depth + 1}}, cfg, "c.pt")
    assert str(e.value) == (f"checkpoint c.pt is of another architecture (embed_dim: checkpoint {cfg.embed_dim * 2} "
                            f"vs config {cfg.embed_dim}; decoder_depth: checkpoint {cfg.decoder_depth + 1} vs config "
                            f"{cfg.decoder_depth}); use the preset and overrides it was trained with, or another run "
                            "directory")


def _meta(**changes):
    meta = {"step": 4, "data": {"micro_batch": 4, "samples_seen": 32, "epoch": 0},
            "rng": {"torch": torch.get_rng_state(), "mask": torch.Generator().get_state(), "cuda": [1, 2]},
            "world": 1, "loader": [{}], "config": {"model": {}}}
    meta.update(changes)
    return meta


@pytest.mark.parametrize("changes,message", [
    ({"step": -1}, "step is -1 (int), expected a whole number >= 0"),
    ({"step": True}, "step is True (bool), expected a whole number >= 0"),
    ({"step": 2.0}, "step is 2.0 (float), expected a whole number >= 0"),
    ({"data": []}, "data is [] (list), expected a table with micro_batch"),
    ({"data": {"epoch": 1}}, "data is {'epoch': 1} (dict), expected a table with micro_batch"),
    ({"data": {"micro_batch": 1, "epoch": -2}}, "data.epoch is -2 (int), expected a whole number >= 0"),
    ({"data": {"micro_batch": 1, "samples_seen": "9"}}, "data.samples_seen is '9' (str), expected a whole number >= 0"),
    ({"data": {"micro_batch": None}}, "data.micro_batch is None (NoneType), expected a whole number >= 0"),
    ({"rng": {"torch": torch.zeros(3)}}, "rng is {'torch': tensor([0., 0., 0.])} (dict), expected a table of "
                                         "generator states (uint8 tensors)"),
    ({"rng": {"mask": torch.zeros(2, dtype=torch.uint8)}}, "rng is {'mask': tensor([0, 0], dtype=torch.uint8)} "
                                                           "(dict), expected a table of generator states (uint8 "
                                                           "tensors)"),
    ({"config": "x" * 70}, "config is '" + "x" * 59 + "... (str), expected a table of settings"),
    ({"config": "x" * 58}, "config is '" + "x" * 58 + "' (str), expected a table of settings"),  # 60 shown: whole
    ({"config": "x" * 59}, "config is '" + "x" * 59 + "... (str), expected a table of settings"),  # 61: cut
    ({"rng": [1]}, "rng is [1] (list), expected a table of generator states (uint8 tensors)"),
    ({"rng": {"torch": torch.get_rng_state(), "mask": [3]}}, "rng.mask is [3] (list), expected a generator state "
                                                             "(uint8 tensor)"),
    ({"rng": {"torch": torch.get_rng_state(), "mask": torch.zeros(2)}}, "rng.mask is tensor([0., 0.]) (Tensor), "
                                                                        "expected a generator state (uint8 tensor)"),
    ({"world": 0}, "world is 0 (int), expected a whole number >= 1"),
    ({"world": True}, "world is True (bool), expected a whole number >= 1"),
    ({"world": "2"}, "world is '2' (str), expected a whole number >= 1"),
    ({"loader": {}}, "loader is {} (dict), expected a list of loader states"),
    ({"config": "debug"}, "config is 'debug' (str), expected a table of settings"),
])
def test_each_resume_field_is_checked_with_its_name(changes, message):
    ckpt.check_training_meta(_meta(), "c.pt")
    ckpt.check_training_meta({**_meta(), "world": 64, "loader": None, "config": None}, "c.pt")
    ckpt.check_training_meta({**_meta(), "data": {"micro_batch": 0}}, "c.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt.check_training_meta(_meta(**changes), "c.pt")
    assert str(e.value) == f"c.pt is not a usable training checkpoint: {message}"


@pytest.mark.parametrize("key", ["step", "data", "rng"])
def test_a_resume_without_a_field_says_which(key):
    meta = _meta()
    del meta[key]
    with pytest.raises(CheckpointError) as e:
        ckpt.check_training_meta(meta, "c.pt")
    assert str(e.value) == (f"c.pt is not a training checkpoint (no {key!r}); to start from weights only, use a new "
                            "run directory")


def test_rng_capture_and_restore_cover_every_named_generator():
    g = torch.Generator().manual_seed(5)
    h = torch.Generator().manual_seed(6)
    torch.manual_seed(1)
    state = ckpt.capture_rng({"mask": g, "crop": h})
    assert set(state) == {"torch", "mask", "crop"}  # no CUDA state without CUDA
    want = (torch.rand(3), torch.rand(3, generator=g), torch.rand(3, generator=h))
    torch.manual_seed(99)
    g.manual_seed(99)
    h.manual_seed(99)
    ckpt.restore_rng(state, {"mask": g, "crop": h, "absent": torch.Generator()})
    got = (torch.rand(3), torch.rand(3, generator=g), torch.rand(3, generator=h))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ckpt.capture_rng() .keys() == {"torch"}
    ckpt.restore_rng({"torch": state["torch"], "cuda": [torch.zeros(1, dtype=torch.uint8)] * 3})  # no CUDA: ignored


# --- weights from elsewhere


def _mae_sd(seed=0):
    torch.manual_seed(seed)
    return build_model(debug().model).state_dict()


def test_formats_are_told_apart_by_their_keys():
    sd = _mae_sd()
    enc = ckpt.encoder_state_dict(sd)
    assert ckpt.detect_format(sd) == "mae"
    assert not any(k.startswith(("decoder_", "mask_token")) for k in enc) and "blocks.0.attn.qkv.weight" in enc
    assert ckpt.detect_format(enc) == "timm"
    head = {"head.weight": torch.zeros(10, 1), "fc_norm.weight": torch.ones(1), "fc_norm.bias": torch.zeros(1)}
    finetuned = {k: v for k, v in enc.items() if not k.startswith("norm.")} | head
    assert ckpt.detect_format(finetuned) == "finetuned"
    assert ckpt.detect_format(enc | head) == "timm"  # fc_norm beside a final norm: a timm model with both
    assert ckpt.detect_format({k: v for k, v in sd.items() if k != "mask_token"}) == "timm"
    assert ckpt.detect_format({k: v for k, v in enc.items() if k != "cls_token"}) == "unknown"
    assert ckpt.detect_format({"cls_token": sd["cls_token"]}) == "unknown"
    assert ckpt.detect_format({"decoder_embed.weight": torch.ones(1)}) == "unknown"
    ref = ckpt.to_reference_format(sd)
    assert set(ref) == {"model"} and all(torch.equal(ref["model"][k], v) for k, v in sd.items())
    assert all(ref["model"][k] is v for k, v in sd.items())  # the tensors themselves: an export holds no second copy
    assert ref["model"] is not sd


def test_imports_of_every_origin(tmp_path):
    from safetensors.torch import save_file

    src = _mae_sd(0)
    enc = ckpt.encoder_state_dict(src)
    torch.save({"model": src}, tmp_path / "mae.pth")
    save_file({k: v.contiguous() for k, v in enc.items()}, str(tmp_path / "timm.safetensors"))
    head = {"head.weight": torch.zeros(10, enc["norm.weight"].shape[0]), "head.bias": torch.zeros(10),
            "fc_norm.weight": torch.ones_like(enc["norm.weight"]), "fc_norm.bias": torch.zeros_like(enc["norm.bias"])}
    torch.save({"model": {k: v for k, v in enc.items() if not k.startswith("norm.")} | head}, tmp_path / "ft.pth")

    model = build_model(debug().model)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt.import_weights(model, tmp_path / "mae.pth") == {"format": "mae", "loaded": len(src), "kept_init": [],
                                                                "resized": []}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.items())

    model = build_model(debug().model)
    model.load_state_dict(fresh)
    got = ckpt.import_weights(model, tmp_path / "timm.safetensors")
    decoder = [k for k in src if k not in enc]
    assert got == {"format": "timm", "loaded": len(enc), "kept_init": decoder, "resized": []}
    after = model.state_dict()
    assert all(torch.equal(after[k], enc[k]) for k in enc) and all(torch.equal(after[k], fresh[k]) for k in decoder)

    model.load_state_dict(fresh)
    got = ckpt.import_weights(model, tmp_path / "ft.pth")
    assert got["format"] == "finetuned" and got["loaded"] == len(enc) - 2
    assert set(got["kept_init"]) == set(decoder) | {"norm.weight", "norm.bias"}
    assert torch.equal(model.state_dict()["norm.weight"], fresh["norm.weight"])

    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.import_weights(model, tmp_path / "odd.pth")
    assert str(e.value) == (f"{tmp_path / 'odd.pth'}: not an MAE, MAE fine-tuned or timm ViT state dict (keys such as "
                            "w)")
    bad = dict(enc)
    bad["pos_embed"] = torch.zeros(1, 5, 3)
    bad.pop("blocks.0.norm1.weight")
    bad["blocks.99.x"] = torch.ones(1)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        ckpt.import_weights(model, tmp_path / "bad.safetensors")
    assert str(e.value) == (f"checkpoint {tmp_path / 'bad.safetensors'} does not fit this model: missing (1): "
                            "blocks.0.norm1.weight; unexpected (1): blocks.99.x; shape mismatch (1): pos_embed: "
                            f"checkpoint (1, 5, 3) vs model {tuple(enc['pos_embed'].shape)}")
    assert all(torch.equal(model.state_dict()[k], fresh[k]) for k in fresh if k.startswith("norm."))  # nothing loaded
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"^cannot read safetensors file .*junk\.safetensors: "):
        ckpt.import_weights(model, tmp_path / "junk.safetensors")


def test_a_rank_whose_own_part_succeeded_still_raises_when_rank_0_failed(tmp_path, one_rank_group, monkeypatch):
    """The failure flag is all-reduced with MAX: a rank with nothing to report raises too, naming the checkpoint,
    so no rank walks on into the next collective alone (another rank's flag stands in for rank 0's here)."""
    import torch.distributed as dist

    seen = []

    def other_rank_failed(t, op=None):
        seen.append((t.clone(), op))
        t.fill_(1.0)

    ckpt._raise_together(None, tmp_path / "ckpt_00000003.dcp", tmp_path)  # nobody failed: returns
    monkeypatch.setattr(dist, "all_reduce", other_rank_failed)
    with pytest.raises(CheckpointError) as e:
        ckpt._raise_together(None, tmp_path / "ckpt_00000003.dcp", tmp_path)
    assert str(e.value) == (f"cannot write ckpt_00000003.dcp in {tmp_path}: rank 0 could not (see its message); the "
                            "checkpoints already there are intact")
    with pytest.raises(CheckpointError, match="^mine$"):
        ckpt._raise_together(CheckpointError("mine"), tmp_path / "ckpt_00000003.dcp", tmp_path)
    assert [(t.tolist(), op) for t, op in seen] == [([0.0], dist.ReduceOp.MAX), ([1.0], dist.ReduceOp.MAX)]
    assert all(t.device.type == "cpu" for t, _ in seen)  # gloo: a CPU flag


def test_a_live_writer_is_asked_about_not_signalled():
    """The liveness probe is signal 0 (no signal is sent): a live process survives the question; a process that
    is not ours to signal (PermissionError) is alive."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"  # every signal back to its default,
                              "for s in signal.valid_signals():\n"  # which ends the process (nohup ignores HUP)
                              "    try: signal.signal(s, signal.SIG_DFL)\n"
                              "    except (OSError, ValueError): pass\n"
                              "time.sleep(30)"])
    try:
        time.sleep(0.3)
        assert ckpt._pid_alive(child.pid)
        time.sleep(0.3)
        assert child.poll() is None  # still running: nothing was delivered to it
    finally:
        child.kill()
        child.wait()
    assert not ckpt._pid_alive(child.pid)


def test_someone_elses_process_counts_as_alive(monkeypatch):
    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", denied)
    assert ckpt._pid_alive(4242)


def test_every_branch_of_a_wrapped_failure_is_searched():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    caused = RuntimeError("a cause and no context")
    caused.__cause__ = full
    assert caused.__context__ is None and ckpt._first_os_error(caused) is full

    assert ckpt._first_os_error(_RanksFailed({0: (full, None), 1: (ValueError("b"), None)})) is full  # not the last
    outer = _RanksFailed({0: (ValueError("rank 0"), None)})
    outer.__cause__ = full
    assert ckpt._first_os_error(outer) is full  # the cause and the ranks' failures both searched


def test_a_persistent_id_in_metadata_is_refused_with_what_it_was():
    import io
    import pickle

    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "p" * 100 if obj == "ref" else None

    buf = io.BytesIO()
    WithPid(buf, protocol=2).dump(["ref"])
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError) as e:
        ckpt.MetadataUnpickler(buf).load()
    assert str(e.value) == f"a persistent id ({'p' * 60!r}) is not checkpoint metadata"


def test_import_errors_name_the_file_and_an_mae_import_is_strict(tmp_path):
    src = _mae_sd(0)
    torch.save({"model": {"w": torch.ones(1), "step": 3}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.import_weights(build_model(debug().model), tmp_path / "odd.pth")
    assert str(e.value) == f"{tmp_path / 'odd.pth'} holds no model state dict"
    keys = {f"k{i}": torch.ones(1) for i in range(7)}
    torch.save(keys, tmp_path / "many.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.import_weights(build_model(debug().model), tmp_path / "many.pth")
    assert str(e.value).endswith("(keys such as k0, k1, k2, k3, k4)")
    partial = {k: v for k, v in src.items() if k != "decoder_pred.bias"}  # still an MAE checkpoint
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.import_weights(build_model(debug().model), tmp_path / "partial.pth")
    assert str(e.value) == (f"checkpoint {tmp_path / 'partial.pth'} does not fit this model: missing (1): "
                            "decoder_pred.bias")


def test_a_refusal_names_the_code_a_pickle_asks_for_and_nothing_benign(tmp_path):
    """What a refused file asks to call is read from its opcodes (never run): GLOBAL and INST (protocols 0-2, module
    and name joined by a dot), STACK_GLOBAL (protocol 4, the two strings before it), inside a torch zip or a bare
    pickle; torch's own rebuild functions, containers, bytes, sets, slices and numpy arrays are not named."""
    import collections
    import pickle

    import numpy as np

    class Reduce:
        def __init__(self, fn, *args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return self.fn, self.args

    benign = {"t": torch.ones(2), "od": collections.OrderedDict(a=1), "b": b"\x00\x01", "s": {1, 2},
              "f": frozenset({3}), "sl": slice(1, 2), "np": np.zeros(2), "np32": np.float32(1).dtype}
    payload = {**benign, "x": Reduce(os.system, "true"), "y": Reduce(os.getcwd), "z": Reduce(os.system, "true")}
    torch.save(payload, tmp_path / "zip.pt")
    assert ckpt._foreign_globals(tmp_path / "zip.pt") == ["posix.system", "posix.getcwd"]  # in order, once each
    torch.save(benign, tmp_path / "benign.pt")
    assert ckpt._foreign_globals(tmp_path / "benign.pt") == []
    for protocol in (0, 2, 4):
        (tmp_path / "bare.pkl").write_bytes(pickle.dumps([Reduce(os.system, "true"), {1}, slice(1)], protocol))
        assert ckpt._foreign_globals(tmp_path / "bare.pkl") == ["posix.system"], protocol
    (tmp_path / "inst.pkl").write_bytes(b"(ibuiltins\neval\np0\n.")  # protocol 0's INST: build an instance
    assert ckpt._foreign_globals(tmp_path / "inst.pkl") == ["builtins.eval"]
    (tmp_path / "damaged.pkl").write_bytes(b"\x80\x04\x95garbage")
    assert ckpt._foreign_globals(tmp_path / "damaged.pkl") == []
    import zipfile

    with zipfile.ZipFile(tmp_path / "nodata.zip", "w") as z:
        z.writestr("archive/version", "3")
    assert ckpt._foreign_globals(tmp_path / "nodata.zip") == []
    big = pickle.dumps(["x" * 100, Reduce(os.system, "true")], 4)
    (tmp_path / "late.pkl").write_bytes(big)
    assert ckpt._foreign_globals(tmp_path / "late.pkl", limit=len(big)) == ["posix.system"]
    assert ckpt._foreign_globals(tmp_path / "late.pkl", limit=60) == []  # past the limit: not read


def test_the_innermost_failure_of_a_dcp_error_is_found():
    inner = ValueError("the shard is short")
    mid = RuntimeError("reading")
    mid.__cause__ = inner
    assert ckpt._root_cause(mid) is inner
    assert ckpt._root_cause(_RanksFailed({0: (mid, "traceback")})) is inner
    assert ckpt._root_cause(_RanksFailed({1: mid})) is inner
    empty = _RanksFailed({})
    assert ckpt._root_cause(empty) is empty
    listed = _RanksFailed([inner])  # not DCP's dict: the exception itself
    assert ckpt._root_cause(listed) is listed
    loop = RuntimeError("loop")
    loop.__cause__ = loop
    assert ckpt._root_cause(loop) is loop


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("0.bias"), "missing (1): 0.bias"),
    (lambda sd: sd.update(extra=torch.ones(1)), "unexpected (1): extra"),
    (lambda sd: sd.update({"1.weight": torch.ones(2, 3)}), "shape mismatch (1): 1.weight: checkpoint (2, 3) vs model "
                                                            "(1, 3)"),
])
def test_each_kind_of_key_mismatch_alone_is_refused(change, message):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    change(sd)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_model_state(model, sd, "m.pt")
    assert str(e.value) == f"checkpoint m.pt does not fit this model: {message}"


@pytest.mark.parametrize("case", ["timm without its final norm", "missing only", "unexpected only"])
def test_an_encoder_import_refuses_each_kind_of_mismatch_alone(tmp_path, case):
    """Only a fine-tuned checkpoint may lack the final norm (its fc_norm replaced it); a missing key alone, or an
    unexpected key alone, is refused with its name."""
    enc = ckpt.encoder_state_dict(_mae_sd(0))
    if case == "timm without its final norm":
        enc = {k: v for k, v in enc.items() if not k.startswith("norm.")}
        want = "missing (2): norm.weight, norm.bias"
    elif case == "missing only":
        enc.pop("blocks.0.attn.proj.bias")
        want = "missing (1): blocks.0.attn.proj.bias"
    else:
        enc["blocks.0.extra"] = torch.ones(1)
        want = "unexpected (1): blocks.0.extra"
    torch.save(enc, tmp_path / "w.pth")
    assert ckpt.detect_format(enc) == "timm"
    with pytest.raises(CheckpointError) as e:
        ckpt.import_weights(build_model(debug().model), tmp_path / "w.pth")
    assert str(e.value) == f"checkpoint {tmp_path / 'w.pth'} does not fit this model: {want}"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _dcp_save(state, d):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving from one process"
        dcp.save(state, checkpoint_id=str(d))
    return d


@pytest.mark.parametrize("form", ["pt", "dcp"])
def test_an_environment_that_turns_weights_only_off_still_runs_no_code(tmp_path, monkeypatch, form):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off torch.load's weights-only default wherever a caller left it
    implicit; every load here names it, so a payload in a file or in a sharded value is still refused."""
    marker = tmp_path / "PWNED"
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    if form == "pt":
        torch.save({"w": torch.ones(1), "x": _Payload(marker)}, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match="it asks to call or build posix.system"):
            ckpt.load_checkpoint(tmp_path / "c.pt")
    else:
        d = _dcp_save({"w": torch.ones(2), "note": _Payload(marker)}, tmp_path / "c.dcp")
        with pytest.raises(CheckpointError, match="it asks to call or build posix.system"):
            ckpt.load_sharded(d)
    assert not marker.exists()


def test_a_sharded_value_holding_a_tensor_loads_onto_the_cpu(tmp_path):
    d = _dcp_save({"w": torch.ones(2), "pair": (torch.arange(3), "three")}, tmp_path / "c.dcp")
    sd = ckpt.load_sharded(d)
    assert torch.equal(sd["w"], torch.ones(2)) and sd["pair"][1] == "three"
    assert torch.equal(sd["pair"][0], torch.arange(3)) and sd["pair"][0].device.type == "cpu"


def test_the_sharded_reader_reads_its_metadata_once_and_stamps_the_load(tmp_path, monkeypatch):
    d = _dcp_save({"w": torch.ones(2)}, tmp_path / "c.dcp")
    reads = []
    real = ckpt.read_dcp_metadata
    monkeypatch.setattr(ckpt, "read_dcp_metadata", lambda p: reads.append(p) or real(p))
    assert torch.equal(ckpt.load_sharded(d)["w"], torch.ones(2))
    assert reads == [d]  # read (and checked) once, before DCP runs
    reader = ckpt.safe_dcp_reader(d)  # no metadata given: it reads it itself, safely
    md = reader.read_metadata()
    assert reads == [d, d] and md.storage_meta.load_id == reader.load_id
    given = real(d)
    kept = given.storage_meta
    reader = ckpt.safe_dcp_reader(d, given)
    assert reader.read_metadata() is given and given.storage_meta is kept and kept.load_id == reader.load_id
    given.storage_meta = None  # written by an older DCP: one is made
    reader = ckpt.safe_dcp_reader(d, given)
    assert reader.read_metadata().storage_meta.load_id == reader.load_id and reads == [d, d]


def test_full_model_state_names_the_file_that_holds_none(tmp_path):
    torch.save({"model": {"w": 1}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt.full_model_state(tmp_path / "c.pt")
    assert str(e.value) == f"{tmp_path / 'c.pt'} holds no model state dict"
    d2 = _dcp_save({"w": torch.ones(1), "note": "text"}, tmp_path / "bare.dcp")
    with pytest.raises(CheckpointError) as e:
        ckpt.full_model_state(d2)
    assert str(e.value) == f"{d2} holds no model state dict"


def test_hand_made_pickles_name_their_globals_whatever_string_opcodes_they_use(tmp_path):
    """A crafted protocol-4 pickle may push STACK_GLOBAL's two strings with any string opcode; protocol 3 names
    builtins' set and frozenset with GLOBAL; numpy 1's reconstruct is benign like numpy 2's."""
    import pickle
    import struct

    def short(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()

    def binunicode(s):
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    def binunicode8(s):
        return b"\x8d" + struct.pack("<Q", len(s)) + s.encode()

    def unicode(s):
        return b"V" + s.encode() + b"\n"

    for push in (short, binunicode, binunicode8, unicode):
        data = b"\x80\x04" + push("posix") + b"\x94" + push("system") + b"\x94\x93." if push is not unicode else (
            b"\x80\x04" + unicode("posix") + unicode("system") + b"\x93.")
        (tmp_path / "p.pkl").write_bytes(data)
        assert ckpt._foreign_globals(tmp_path / "p.pkl") == ["posix.system"], push.__name__
    (tmp_path / "p3.pkl").write_bytes(pickle.dumps([{1}, frozenset({2}), os.system], protocol=3))
    assert ckpt._foreign_globals(tmp_path / "p3.pkl") == ["posix.system"]
    (tmp_path / "np1.pkl").write_bytes(b"cnumpy.core.multiarray\n_reconstruct\ncposix\nsystem\n.")
    assert ckpt._foreign_globals(tmp_path / "np1.pkl") == ["posix.system"]


def test_a_file_checkpoint_resumes_into_a_sharded_model(tmp_path, one_rank_group):
    """A single-process run's .pt continued under FSDP2 (a one-rank gloo group here): full state dicts are
    loaded into the sharded parameters and optimizer state, equal to the file's tensors."""
    from torch.distributed.fsdp import fully_shard

    src = _trained(0)
    p = ckpt.save_training_checkpoint(tmp_path, 1, *src, {"step": 1}, keep_last=1, sharded=False)
    torch.manual_seed(1)
    model = build_model(debug().model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32), 0.75)[0].backward()
    opt.step()
    ckpt.load_training_checkpoint(p, model, opt)
    full = ckpt._sd_api().get_model_state_dict(model, options=ckpt._sd_api().StateDictOptions(full_state_dict=True))
    assert full.keys() == src[0].state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in src[0].state_dict().items())
    osd = ckpt._sd_api().get_optimizer_state_dict(model, opt,
                                                  options=ckpt._sd_api().StateDictOptions(full_state_dict=True))
    want = ckpt.load_checkpoint(p)["optim"]["state"]
    assert osd["state"].keys() == want.keys()
    assert all(torch.equal(osd["state"][k]["exp_avg"], want[k]["exp_avg"]) for k in want)


def test_a_file_checkpoint_that_does_not_fit_is_named(tmp_path):
    src = _trained(0)
    p = ckpt.save_training_checkpoint(tmp_path, 1, *src, {"step": 1, "config": {"model": {"depth": 99}}},
                                      keep_last=1, sharded=False)
    dst = _trained(1)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_training_checkpoint(p, *dst, model_cfg=debug().model)
    assert str(e.value).startswith(f"checkpoint {p} is of another architecture (depth: checkpoint 99 vs config ")
    obj = ckpt.load_checkpoint(p)
    obj["model"].pop("cls_token")
    torch.save(obj, p)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_training_checkpoint(p, *dst)
    assert str(e.value) == f"checkpoint {p} does not fit this model: missing (1): cls_token"
    obj["model"] = {"w": 1}
    torch.save(obj, p)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_training_checkpoint(p, *dst)
    assert str(e.value) == f"{p} holds no model state dict"


def test_a_refusal_says_what_was_asked_for_in_one_line(tmp_path):
    import pickle

    junk = tmp_path / "c.pt"
    junk.write_bytes(b"not a pickle")  # names no global: the message comes from the error alone
    tail = ", which a checkpoint never needs; checkpoints are loaded as tensors and plain values and nothing in them is run"
    e = ckpt.refusal(junk, pickle.UnpicklingError("a persistent id ('p') is not checkpoint metadata"))
    assert str(e) == f"refused {junk}: it asks for a persistent id ('p'){tail}"
    e = ckpt.refusal(junk, pickle.UnpicklingError("opcode 0x42 is not allowed"))
    assert str(e) == f"refused {junk}: it holds objects other than tensors and plain values{tail}"
    e = ckpt.refusal(junk, RuntimeError("Unsupported global: GLOBAL posix.system was not an allowed global"))
    assert str(e) == f"refused {junk}: it asks to call or build posix.system{tail}"
    e = ckpt.refusal(junk, RuntimeError("Load with weights_only=False?\n\n  PytorchStreamReader failed reading zip\n"))
    assert str(e) == (f"cannot read checkpoint {junk}: not a PyTorch checkpoint, or damaged (RuntimeError: "
                      "PytorchStreamReader failed reading zip)")  # the first line that is not the unsafe advice
    assert str(ckpt.refusal(junk, KeyError())).endswith("damaged (KeyError: KeyError)")  # no text: its type
    e = ckpt.refusal(junk, ValueError("v" * 200))
    assert str(e).endswith(f"damaged (ValueError: {'v' * 160})")


def test_a_sharded_save_makes_its_directory_clears_a_stale_attempt_and_marks_its_writer(tmp_path, one_rank_group,
                                                                                     monkeypatch):
    src = _trained(0)
    run = tmp_path / "a" / "b"  # no parent yet
    stale = run / ".ckpt_00000002.dcp.tmp"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a killed save")
    p = ckpt.save_training_checkpoint(run, 2, *src, {"step": 2}, keep_last=2, sharded=True)
    assert not (p / "junk").exists() and not stale.exists() and ckpt.read_meta(p) == {"step": 2}
    fresh = tmp_path / "c" / "d"
    assert ckpt.save_training_checkpoint(fresh, 1, *src, {"step": 1}, keep_last=2, sharded=True).is_dir()
    monkeypatch.setattr(socket, "gethostname", lambda: "node1.cluster.example")
    real = os.replace

    def no_rename(a, b):
        if str(a).endswith(".dcp.tmp"):
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(CheckpointError):
        ckpt.save_training_checkpoint(run, 3, *src, {"step": 3}, keep_last=2, sharded=True)
    left = run / ".ckpt_00000003.dcp.tmp"
    assert (left / ".writer").read_text() == f"node1-cluster-example {os.getpid()}\n"  # how a later run tells


def test_a_full_disk_during_a_sharded_save_is_one_line_and_other_failures_pass_through(tmp_path, one_rank_group,
                                                                                      monkeypatch):
    """DCP wraps a rank's OSError in its own exception: the disk error behind it becomes the one-line CheckpointError
    naming the checkpoint and the directory; an error that is not the disk's is not disguised as one."""
    import errno

    import torch.distributed.checkpoint as dcp

    src = _trained(0)

    def full(*a, **k):
        raise _RanksFailed({0: (OSError(errno.ENOSPC, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.save_training_checkpoint(tmp_path, 2, *src, {"step": 2}, keep_last=1, sharded=True)
    assert str(e.value) == (f"cannot write ckpt_00000002.dcp in {tmp_path}: no space left on the device; the "
                            "checkpoints already there are intact")
    assert ckpt.list_checkpoints(tmp_path) == []

    def broken(*a, **k):
        raise _RanksFailed({0: (ValueError("a bug"), None)})

    monkeypatch.setattr(dcp, "save", broken)
    with pytest.raises(_RanksFailed):
        ckpt.save_training_checkpoint(tmp_path, 3, *src, {"step": 3}, keep_last=1, sharded=True)


# --- what other writers and pruners do meanwhile


def _removed_first_by_another(monkeypatch, under):
    """os.unlink of a file under `under` finds it already removed by another process (a second pruner of the same
    directory got there a moment before): the file goes, then the call fails as it would."""
    real = os.unlink

    def raced(path, *a, dir_fd=None, **k):
        full = os.path.join(f"/proc/self/fd/{dir_fd}", path) if dir_fd is not None else path
        if str(os.path.realpath(full)).startswith(str(under)):
            real(path, *a, dir_fd=dir_fd, **k)
        return real(path, *a, dir_fd=dir_fd, **k)

    monkeypatch.setattr(os, "unlink", raced)


def test_pruning_alongside_another_pruner_removes_what_is_left_and_raises_nothing(tmp_path, monkeypatch):
    for step, form in [(1, "pt"), (2, "dcp"), (3, "pt"), (4, "dcp"), (5, "pt")]:
        _touch_ckpt(tmp_path, step, form)
    _removed_first_by_another(monkeypatch, tmp_path)
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000004.dcp", "ckpt_00000005.pt"]


def test_stale_files_removed_meanwhile_by_another_run_raise_nothing(tmp_path, monkeypatch):
    dead = 2**22 + 12345
    host = socket.gethostname().replace(".", "-")
    f = tmp_path / f".ckpt_00000002.pt.{host}-{dead}.ab12.tmp"
    f.write_bytes(b"x")
    d = tmp_path / ".ckpt_00000003.dcp.tmp"
    d.mkdir()
    (d / ".writer").write_text(f"{host} {dead}\n")
    (d / "__0_0.distcp").write_bytes(b"x")
    _removed_first_by_another(monkeypatch, tmp_path)
    assert set(ckpt.remove_stale_temp_files(tmp_path)) == {f, d}
    assert list(tmp_path.iterdir()) == []


def test_stale_files_on_a_host_with_dots_in_its_name(tmp_path, monkeypatch):
    """Temporary names carry the host with "." made "-" (TEMP_RE's host has no dots): the cleaner compares the same
    spelling, so this host's live writer stays however old its file, and its dead writer's file goes at once."""
    monkeypatch.setattr(socket, "gethostname", lambda: "node1.cluster.example")
    dead = 2**22 + 12345
    live = tmp_path / f".ckpt_00000002.pt.node1-cluster-example-{os.getpid()}.ab12.tmp"
    live.write_bytes(b"x")
    _aged(live, 7200)
    gone = tmp_path / f".ckpt_00000003.pt.node1-cluster-example-{dead}.cd34.tmp"
    gone.write_bytes(b"x")
    assert ckpt.remove_stale_temp_files(tmp_path) == [gone] and live.exists()


def test_the_cleaner_goes_on_past_what_it_cannot_stat_and_past_a_directory_without_a_writer(tmp_path):
    """A name that cannot be stat'ed (a dangling link; a file removed meanwhile) is skipped, not the end of the
    scan; a sharded save's directory killed before its .writer was written is judged by age, like an untagged file."""
    old = [tmp_path / f".old{i:02d}.tmp" for i in range(24)]
    for i, p in enumerate(old):
        if i % 8 == 0:  # dangling links created first, among and last: the scan meets one early in any order
            (tmp_path / f".dangling{i}.tmp").symlink_to(tmp_path / "nowhere")
        p.write_bytes(b"x")
        _aged(p, 7200)
    (tmp_path / ".dangling.tmp").symlink_to(tmp_path / "nowhere")
    nowriter = tmp_path / ".ckpt_00000004.dcp.tmp"
    nowriter.mkdir()
    _aged(nowriter, 7200)
    young = tmp_path / ".ckpt_00000005.dcp.tmp"
    young.mkdir()
    assert set(ckpt.remove_stale_temp_files(tmp_path)) == {*old, nowriter}
    assert {p.name for p in tmp_path.iterdir()} == {".dangling.tmp", ".dangling0.tmp", ".dangling8.tmp",
                                                    ".dangling16.tmp", young.name}


def test_the_default_age_for_a_file_of_unknown_writer_is_one_hour(tmp_path):
    p = tmp_path / ".something.tmp"
    p.write_bytes(b"x")
    _aged(p, 3600.5)  # past the hour by half a second
    assert ckpt.remove_stale_temp_files(tmp_path, min_age_s=3601) == []
    assert ckpt.remove_stale_temp_files(tmp_path) == [p]


# --- a sharded save's failures after its shards are written, and on the ranks that did not fail


def test_a_failed_rename_of_a_sharded_save_names_the_checkpoint_and_directory(tmp_path, one_rank_group, monkeypatch):
    src = _trained(0)
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(5, "Input/output error"))
                        if str(a).endswith(".dcp.tmp") else real(a, b))
    with pytest.raises(CheckpointError) as e:
        ckpt.save_training_checkpoint(tmp_path, 3, *src, {"step": 3}, keep_last=2, sharded=True)
    assert str(e.value) == (f"cannot write ckpt_00000003.dcp in {tmp_path}: Input/output error; the checkpoints "
                            "already there are intact")
    assert ckpt.list_checkpoints(tmp_path) == []


def test_a_sharded_save_whose_meta_cannot_be_written_fails_and_publishes_nothing(tmp_path, one_rank_group,
                                                                                monkeypatch):
    src = _trained(0)
    ckpt.save_training_checkpoint(tmp_path, 1, *src, {"step": 1}, keep_last=2, sharded=True)

    def full(obj, path):
        raise CheckpointError(f"cannot write meta.pt in {tmp_path}: no space left on the device")

    monkeypatch.setattr(ckpt, "atomic_torch_save", full)
    with pytest.raises(CheckpointError, match="^cannot write meta.pt in .*: no space left on the device$"):
        ckpt.save_training_checkpoint(tmp_path, 2, *src, {"step": 2}, keep_last=2, sharded=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000001.dcp"]


@pytest.mark.parametrize("which", ["before the shards", "after the shards"])
def test_a_rank_other_than_0_raises_naming_the_checkpoint_when_rank_0_fails(tmp_path, one_rank_group, monkeypatch,
                                                                           which):
    """On a rank that is not rank 0 (is_main False) every part of its own succeeds; rank 0's failure, before the
    shards (making the directory) or after them (meta, rename), reaches it through the MAX flag (stood in for here),
    and it raises naming the checkpoint and the run directory, never walking on alone."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    src = _trained(0)
    votes = []

    def rank_0_votes(t, op=None):
        votes.append(op)
        t.fill_(1.0 if (len(votes) == 1) == (which == "before the shards") else 0.0)

    monkeypatch.setattr(dist, "all_reduce", rank_0_votes)
    monkeypatch.setattr(dcp, "save", lambda *a, **k: None)  # this rank's shards: written
    with pytest.raises(CheckpointError) as e:
        ckpt.save_training_checkpoint(tmp_path, 7, *src, {"step": 7}, keep_last=2, sharded=True, is_main=False)
    assert str(e.value) == (f"cannot write ckpt_00000007.dcp in {tmp_path}: rank 0 could not (see its message); the "
                            "checkpoints already there are intact")
    assert len(votes) == (1 if which == "before the shards" else 2)


# --- a sharded checkpoint's .metadata: every way it can be wrong, in its own words


def test_each_damage_to_a_sharded_metadata_is_named_in_one_line(tmp_path):
    import pickle

    d = _dcp_save({"w": torch.ones(2)}, tmp_path / "c.dcp")
    md = (d / ".metadata").read_bytes()
    (d / ".metadata").write_bytes(md + pickle.dumps(1))  # a second (benign) pickle after the first's end
    with pytest.raises(CheckpointError) as e:
        ckpt.read_dcp_metadata(d)
    assert str(e.value) == (f"refused {d}: .metadata has data after its end, which DCP never writes; checkpoints are "
                            "loaded as tensors and plain values and nothing in them is run")
    (d / ".metadata").write_bytes(md + b"cos\nsystem\n(S'echo'\ntR.")  # a payload after the end: read from its start
    with pytest.raises(CheckpointError) as e:
        ckpt.read_dcp_metadata(d)
    assert str(e.value) == (f"refused {d}: it asks to call or build os.system, which a checkpoint never needs; "
                            "checkpoints are loaded as tensors and plain values and nothing in them is run")
    (d / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError) as e:
        ckpt.read_dcp_metadata(d)
    assert str(e.value) == f"cannot load sharded checkpoint {d}: its .metadata holds a dict, not DCP metadata"
    (d / ".metadata").write_bytes(b"")  # a save killed before it wrote any
    with pytest.raises(CheckpointError) as e:
        ckpt.read_dcp_metadata(d)
    assert str(e.value) == f"cannot load sharded checkpoint {d}: damaged or incomplete metadata (EOFError: Ran out of input)"
    (d / ".metadata").unlink()
    (d / ".metadata").mkdir()
    with pytest.raises(CheckpointError) as e:
        ckpt.read_dcp_metadata(d)
    assert str(e.value) == f"cannot read {d / '.metadata'}: Is a directory"


def test_a_sharded_load_into_a_state_reads_its_metadata_once(tmp_path, monkeypatch):
    d = _dcp_save({"w": torch.ones(2)}, tmp_path / "c.dcp")
    reads = []
    real = ckpt.read_dcp_metadata
    monkeypatch.setattr(ckpt, "read_dcp_metadata", lambda p: reads.append(p) or real(p))
    state = {"w": torch.zeros(2)}
    assert ckpt.load_sharded(d, state) is state and torch.equal(state["w"], torch.ones(2))
    assert reads == [d]  # the checked metadata is the one DCP loads with


@pytest.mark.parametrize("rel", [".", "..", "../x.distcp", "/etc/passwd", ""])
def test_a_shard_file_outside_the_checkpoint_is_refused(tmp_path, rel):
    import dataclasses
    import pickle

    d = _dcp_save({"w": torch.ones(2)}, tmp_path / "c.dcp")
    md = pickle.loads((d / ".metadata").read_bytes())  # written by DCP itself: plain pickle is fine here
    md.storage_data = {k: dataclasses.replace(v, relative_path=rel) for k, v in md.storage_data.items()}
    (d / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError) as e:
        ckpt.read_dcp_metadata(d)
    assert str(e.value) == f"refused {d}: its .metadata names a shard file outside the checkpoint ({rel!r})"


def test_the_meta_of_a_file_checkpoint_leaves_out_the_weights_and_either_optimizer_key(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "optim": {"s": 1}, "optimizer": {"s": 2}, "epoch": 3, "step": 9},
               tmp_path / "c.pt")
    assert ckpt.read_meta(tmp_path / "c.pt") == {"epoch": 3, "step": 9}
