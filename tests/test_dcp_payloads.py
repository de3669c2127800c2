"""A sharded checkpoint never runs code: a corpus of crafted `.metadata` and value payloads (GLOBAL and STACK_GLOBAL at
protocols 0-5, dotted names through modules the metadata may use, INST / OBJ / NEWOBJ / NEWOBJ_EX / EXT / persistent
ids, the copyreg / functools.partial / builtins.getattr / operator.attrgetter routes, a payload before, inside and after
the genuine metadata, a payload in a `.distcp` value entry), each refused by every command that reads a checkpoint
with one line naming what it asked for; and generated metadata-shaped pickles (hypothesis) with a forbidden global
anywhere in them."""

from __future__ import annotations

import copyreg
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import debug_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import checkpoint as ckpt
from engine.cli import main

MD = "torch.distributed.checkpoint.metadata"


def _s(text: str) -> bytes:
    """SHORT_BINUNICODE / BINUNICODE of `text`."""
    b = text.encode()
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + len(b).to_bytes(4, "little")) + b


def stack_global(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + b"\x93"


def text_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call1(glob: bytes, arg: bytes) -> bytes:
    """glob(arg) through REDUCE (arg is already pickled)."""
    return glob + arg + b"\x85R"


def _touch(marker) -> str:
    return f"touch {marker}"


def genuine(d: Path) -> bytes:
    return (d / ".metadata").read_bytes()


def without_stop(p: bytes) -> bytes:
    assert p.endswith(b".")
    return p[:-1]


def corpus(marker: Path, real: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (the bytes of a `.metadata`, the global its refusal names)."""
    cmd = _touch(marker)

    class Payload:
        def __reduce__(self):
            return (os.system, (cmd,))

    sysname = f"{os.system.__module__}.system"  # posix.system
    out = {}
    for proto in range(6):  # pickle's own encoding of a call at every protocol
        out[f"reduce_protocol_{proto}"] = (pickle.dumps(Payload(), protocol=proto), sysname)
    out["global_protocol_0_text"] = (text_global("os", "system") + b"(V" + cmd.encode() + b"\ntR.", "os.system")
    out["dotted_global_through_dcp_metadata"] = (
        b"\x80\x04" + call1(stack_global(MD, "os.system"), _s(cmd)) + b".", f"{MD}.os.system")
    out["dotted_text_global_through_dcp_metadata"] = (
        text_global(MD, "os.system") + b"(V" + cmd.encode() + b"\ntR.", f"{MD}.os.system")
    out["dotted_global_through_pathlib"] = (
        b"\x80\x04" + call1(stack_global("pathlib", "os.system"), _s(cmd)) + b".", "pathlib.os.system")
    out["dotted_global_through_torch"] = (
        b"\x80\x04" + call1(stack_global("torch", "serialization.os.system"), _s(cmd)) + b".",
        "torch.serialization.os.system")
    out["other_name_of_an_allowed_module"] = (
        b"\x80\x04" + call1(stack_global("torch.serialization", "load"), _s(str(marker))) + b".",
        "torch.serialization.load")
    out["attribute_of_an_allowed_class"] = (
        b"\x80\x04" + call1(stack_global("torch", "Size.__class__"), _s("x")) + b".", "torch.Size.__class__")
    out["copyreg_reconstructor"] = (
        b"\x80\x02" + stack_global("copyreg", "_reconstructor") + b"(" + stack_global("os", "system")
        + stack_global("builtins", "object") + b"NtR.", "copyreg._reconstructor")
    out["functools_partial"] = (
        b"\x80\x04" + stack_global("functools", "partial") + stack_global("os", "system") + _s(cmd) + b"\x86R)R.",
        "functools.partial")
    out["builtins_getattr"] = (
        b"\x80\x04" + stack_global("builtins", "getattr") + call1(stack_global("builtins", "__import__"), _s("os"))
        + _s("system") + b"\x86R" + _s(cmd) + b"\x85R.", "builtins.getattr")
    out["operator_attrgetter"] = (
        b"\x80\x04" + call1(stack_global("operator", "attrgetter"), _s("system"))
        + call1(stack_global("importlib", "import_module"), _s("os")) + b"\x85R" + _s(cmd) + b"\x85R.",
        "operator.attrgetter")
    out["inst_opcode"] = (b"(V" + cmd.encode() + b"\nios\nsystem\n.", "os.system")
    out["obj_opcode"] = (b"\x80\x02(" + stack_global("subprocess", "Popen") + _s(cmd) + b"o.", "subprocess.Popen")
    out["newobj_opcode"] = (b"\x80\x02" + stack_global("subprocess", "Popen") + _s(cmd) + b"\x85\x81.",
                            "subprocess.Popen")
    out["newobj_ex_opcode"] = (b"\x80\x04" + stack_global("subprocess", "Popen") + _s(cmd) + b"\x85}\x92.",
                               "subprocess.Popen")
    out["build_setstate"] = (b"\x80\x04" + stack_global("logging", "Logger") + _s("x") + b"\x85R}b.",
                             "logging.Logger")
    out["ext1_opcode"] = (b"\x80\x02\x82\xf0" + _s(cmd) + b"\x85R.", sysname)  # the code registered by the test
    out["persistent_id"] = (b"\x80\x02" + _s("os.system") + b"Q.", "persistent id")
    out["payload_before_the_genuine_metadata"] = (
        without_stop(pickle.dumps(Payload(), protocol=2)) + b"0" + real, sysname)
    out["payload_after_the_genuine_metadata"] = (real + pickle.dumps(Payload(), protocol=4), sysname)
    from torch.distributed.checkpoint.metadata import Metadata

    md = pickle.loads(real)
    assert isinstance(md, Metadata)
    md.storage_meta = Payload()
    out["payload_inside_the_genuine_metadata"] = (pickle.dumps(md, protocol=4), sysname)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A real ckpt_XXXXXXXX.dcp/ (model + optimizer + meta.pt) of a two-step debug run."""
    from test_checkpoint_safety import _sharded_checkpoint

    return _sharded_checkpoint(tmp_path_factory.mktemp("src"), step=2)


@pytest.fixture
def ext_code():
    """An extension code for posix.system (EXT1 0xf0), as a library in the reading process might register one."""
    copyreg.add_extension(os.system.__module__, "system", 0xF0)
    yield
    copyreg.remove_extension(os.system.__module__, "system", 0xF0)


def _plant(sharded: Path, where: Path, payload: bytes) -> Path:
    d = where / "run" / sharded.name
    shutil.copytree(sharded, d)
    (d / ".metadata").write_bytes(payload)
    return d


def _commands(d: Path, tmp_path: Path) -> dict[str, list[str]]:
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (90, 10, 200)).save(img)
    return {
        "resume": ["pretrain", "--preset", "debug", "--run-dir", str(d.parent), "--resume", "--train.device", "cpu",
                   "--data.backend", "torchvision", "--data.num_workers", "0", "--train.max_steps", "3"],
        "visualize": ["visualize", str(d), str(img), "--out", str(tmp_path / "out" / "g.png")],
        "export": ["export", str(d), "--out", str(tmp_path / "out" / "e.pth")],
        "import": ["import", str(d), "--preset", "debug", "--out", str(tmp_path / "out" / "i.pt")],
        "eval": ["eval", "knn", "--checkpoint", str(d), "--train", str(tmp_path), "--val", str(tmp_path)],
    }


CORPUS_NAMES = [
    *(f"reduce_protocol_{p}" for p in range(6)), "global_protocol_0_text", "dotted_global_through_dcp_metadata",
    "dotted_text_global_through_dcp_metadata", "dotted_global_through_pathlib", "dotted_global_through_torch",
    "other_name_of_an_allowed_module", "attribute_of_an_allowed_class", "copyreg_reconstructor", "functools_partial",
    "builtins_getattr", "operator_attrgetter", "inst_opcode", "obj_opcode", "newobj_opcode", "newobj_ex_opcode",
    "build_setstate", "ext1_opcode", "persistent_id", "payload_before_the_genuine_metadata",
    "payload_after_the_genuine_metadata", "payload_inside_the_genuine_metadata"]


def test_the_corpus_is_the_one_named_and_each_payload_really_runs_code_under_plain_pickle(sharded, tmp_path,
                                                                                          ext_code):
    """Without the restricted reader every payload meant to call would run (proof that the corpus is live)."""
    marker = tmp_path / "PWNED"
    payloads = corpus(marker, genuine(sharded))
    assert sorted(payloads) == sorted(CORPUS_NAMES) and len(payloads) >= 20
    for name in ("reduce_protocol_0", "reduce_protocol_5", "dotted_global_through_dcp_metadata", "builtins_getattr",
                 "operator_attrgetter", "inst_opcode", "ext1_opcode", "payload_before_the_genuine_metadata",
                 "functools_partial"):
        marker.unlink(missing_ok=True)
        try:
            pickle.loads(payloads[name][0])
        except Exception:  # noqa: BLE001 - some return oddities after the call ran
            pass
        assert marker.exists(), name


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_each_payload_is_refused_naming_what_it_asked_for(sharded, tmp_path, name, ext_code):
    marker = tmp_path / "PWNED"
    payload, asked = corpus(marker, genuine(sharded))[name]
    d = _plant(sharded, tmp_path, payload)
    for read in (ckpt.read_dcp_metadata, ckpt.full_model_state):
        with pytest.raises(ckpt.CheckpointError) as e:
            read(d)
        msg = str(e.value)
        assert f"refused {d}" in msg and asked in msg and "\n" not in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize("command", ["resume", "visualize", "export", "import", "eval"])
@pytest.mark.parametrize("name", ["dotted_global_through_dcp_metadata", "payload_before_the_genuine_metadata",
                                  "payload_after_the_genuine_metadata", "builtins_getattr", "newobj_ex_opcode"])
def test_every_command_refuses_a_payload_in_one_line_and_writes_nothing(sharded, tmp_path, capsys, name, command):
    marker = tmp_path / "PWNED"
    payload, asked = corpus(marker, genuine(sharded))[name]
    d = _plant(sharded, tmp_path, payload)
    before = sorted(p.name for p in d.parent.iterdir())
    assert main(_commands(d, tmp_path)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert f"refused {d}" in err and asked in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in d.parent.iterdir()) == before  # the run directory untouched (config.toml too)


def _value_payload(sharded: Path, tmp_path: Path, key: str) -> Path:
    """The checkpoint rewritten with one non-tensor value (a DCP BYTE_IO entry) replaced by a code-running object."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (_touch(marker),))

    sd = ckpt.load_sharded(sharded)
    node = sd
    *path, last = key.split(".")
    for k in path:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[last] = Payload()
    d = tmp_path / "run" / sharded.name
    d.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(d))
    shutil.copy(sharded / "meta.pt", d / "meta.pt")
    return d


@pytest.mark.parametrize("command", ["resume", "export"])
def test_a_payload_in_a_shard_value_is_refused_by_the_commands(sharded, tmp_path, capsys, command):
    d = _value_payload(sharded, tmp_path, "optim.param_groups.0.lr")
    assert main(_commands(d, tmp_path)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert f"refused {d}" in err and "system" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_a_storage_entry_outside_the_checkpoint_is_refused(sharded, tmp_path):
    md = pickle.loads(genuine(sharded))
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    d = _plant(sharded, tmp_path, pickle.dumps(md, protocol=4))
    with pytest.raises(ckpt.CheckpointError, match="outside the checkpoint"):
        ckpt.read_dcp_metadata(d)


def test_the_genuine_metadata_still_reads_and_resumes_exactly(sharded, tmp_path):
    from engine.trainer import Trainer

    md = ckpt.read_dcp_metadata(sharded)
    assert md.state_dict_metadata == pickle.loads(genuine(sharded)).state_dict_metadata
    d = tmp_path / "run" / sharded.name
    shutil.copytree(sharded, d)
    t = Trainer(debug_cfg(d.parent, **{"train.max_steps": 3}), resume=True, log=lambda m: None)
    assert t.step == 2


# --- generated: metadata-shaped pickles with a forbidden global anywhere ---------------------------------------

FORBIDDEN = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("subprocess", "Popen"), (MD, "os.system"), (MD, "os"), ("torch", "load"), ("torch", "Size.mro"),
             ("pathlib", "os.system"), ("torch.serialization", "load"), ("collections", "namedtuple"),
             ("torch.distributed.checkpoint.filesystem", "pickle.loads"), ("shutil", "rmtree"),
             ("importlib", "import_module"), ("builtins", "__import__")]


def _leaf():
    return st.one_of(st.integers(-5, 10**6), st.text(max_size=8), st.none(), st.booleans(),
                     st.sampled_from([torch.Size([3, 4]), torch.float32, torch.bfloat16, Path("a/b")]))


@st.composite
def metadata_shaped(draw):
    """(bytes, forbidden pair or None): a structure of DCP-metadata-like containers, with or without one forbidden
    global called somewhere in it, pickled at any protocol."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    tree = draw(st.recursive(
        st.one_of(_leaf(), st.builds(lambda o: ChunkStorageMetadata(offsets=torch.Size([o]), sizes=torch.Size([1])),
                                     st.integers(0, 99)),
                  st.builds(lambda n: MetadataIndex(fqn=n), st.text(max_size=6))),
        lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=5), kids, max_size=4),
                               st.tuples(kids, kids)), max_leaves=12))
    evil = draw(st.one_of(st.none(), st.sampled_from(FORBIDDEN)))
    proto = draw(st.integers(2, 5))  # DCP pickles at the default protocol; protocols 0-1 are in the corpus

    class Call:
        def __reduce__(self):
            return (_Named(*evil), ("x",))

    if evil is not None:
        slot = draw(st.integers(0, 2))
        tree = [Call(), tree] if slot == 0 else [tree, Call()] if slot == 1 else {"k": [tree, {"z": Call()}]}
    import io

    buf = io.BytesIO()
    _GlobalWriter(buf, protocol=proto).dump(tree)
    return buf.getvalue(), evil


class _Named:
    """Stands for the global (module, qualified name), whatever that name is."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *a):  # pragma: no cover - pickled, never called
        raise AssertionError


class _GlobalWriter(pickle._Pickler):
    """The pure-Python pickler, writing a _Named as the GLOBAL / STACK_GLOBAL of its pair."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_named(self, obj):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_Named] = save_named


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metadata_shaped())
def test_generated_metadata_shaped_pickles(case):
    data, evil = case
    import io

    try:
        ckpt.MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        assert evil is not None, e
        assert f"GLOBAL {evil[0]}.{evil[1]} " in str(e), (str(e), evil)
    else:
        assert evil is None
