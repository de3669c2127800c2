import json
import math

import pytest
import torch

from engine import checkpoint as ckpt
from engine.optim import lr_at, param_groups
from engine.errors import DivergenceError
from engine.trainer import Trainer

from conftest import debug_cfg


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    straight = Trainer(debug_cfg(tmp_path / "a", **{"train.max_steps": 10, "train.ckpt_every": 100}))
    straight.fit()
    first = Trainer(debug_cfg(tmp_path / "b", **{"train.max_steps": 5, "train.ckpt_every": 100}))
    first.fit()
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "ckpt_00000005.pt"
    second = Trainer(debug_cfg(tmp_path / "b", **{"train.max_steps": 10, "train.ckpt_every": 100}), resume=True)
    assert second.step == 5 and second.micro_batch == 5
    second.fit()
    a, b = params_of(straight), params_of(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the optimizer state too
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_resume_with_accumulation_continues_data_position(tmp_path):
    over = {"train.accum_steps": 2, "train.batch_size": 8, "train.ckpt_every": 100}
    straight = Trainer(debug_cfg(tmp_path / "a", **over, **{"train.max_steps": 4}))
    straight.fit()
    Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 2})).fit()
    resumed = Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 4}), resume=True)
    assert resumed.micro_batch == 4
    resumed.fit()
    for k, v in params_of(straight).items():
        assert torch.equal(v, params_of(resumed)[k]), k


def test_run_dir_outputs_and_loss_falls(tmp_path):
    cfg = debug_cfg(tmp_path, **{"train.max_steps": 60, "train.log_every": 10, "train.vis_every": 30,
                                 "train.ckpt_every": 30, "train.keep_last": 1, "train.tensorboard": "true"})
    res = Trainer(cfg).fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50, 60]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.1
    for r in recs:
        assert {"loss", "lr", "img_per_s", "step_ms", "epoch", "skipped", "tflops_per_s"} <= r.keys()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000060.pt"]  # keep_last=1
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == [
        "heldout.json", "heldout_step_00000030.png", "heldout_step_00000060.png", "step_00000030.png",
        "step_00000060.png"]
    held = json.loads((tmp_path / "recon" / "heldout.json").read_text())
    assert held["step"] == 60 and 0 < held["heldout_error"] == res.heldout_error and held["baseline_patch_mean"] == 1.0
    assert [r.get("heldout_error") is not None for r in recs] == [False, False, True, False, False, True]
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "config.toml").is_file()
    assert any((tmp_path / "tb").iterdir())
    assert res.step == 60 and res.checkpoint == tmp_path / "ckpt_00000060.pt"




def _expect_unchanged(trainer, from_step: int, to_step: int) -> None:
    """Wrap trainer.optimizer_step: the parameters at step `to_step` must equal those at step `from_step`."""
    before = {}
    orig_step = trainer.optimizer_step

    def spy(stream):
        if trainer.step == from_step:
            before.update(params_of(trainer))
        out = orig_step(stream)
        if trainer.step == to_step:
            for k, v in params_of(trainer).items():
                assert torch.equal(v, before[k]), k
        return out

    trainer.optimizer_step = spy


def _poison(trainer, from_call: int, until_call: int = 10**9):
    """Make the model's loss NaN on forward calls [from_call, until_call)."""
    model = trainer.model
    calls = {"n": 0}
    orig = model.forward_loss

    def forward_loss(imgs, pred, mask, **kw):
        calls["n"] += 1
        loss = orig(imgs, pred, mask, **kw)
        return loss * float("nan") if from_call <= calls["n"] < until_call else loss

    model.forward_loss = forward_loss


def test_non_finite_steps_are_skipped_not_applied(tmp_path):
    t = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 6, "train.log_every": 3, "train.max_bad_steps": 5}))
    _poison(t, 3, 5)  # steps 3 and 4 get a NaN loss
    _expect_unchanged(t, 2, 4)  # after the two bad steps: nothing moved
    t.fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in recs) == 2
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert t.optimizer.state_dict()["state"][0]["step"].item() == 4  # 6 steps, 2 skipped


def test_consecutive_non_finite_steps_stop_with_clear_error(tmp_path):
    t = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 40, "train.log_every": 2, "train.max_bad_steps": 3,
                                       "train.ckpt_every": 2}))
    _poison(t, 5)
    with pytest.raises(DivergenceError, match=r"consecutive bad steps since step 5 .* The last checkpoint written "
                                                 r"before it is .*ckpt_00000004.pt"):
        t.fit()
    assert t.step < 12
    # the checkpoints written before are intact and loadable
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no temp file left behind
    assert torch.equal(ckpt.load_checkpoint(good)["w"], torch.ones(3))


def test_param_groups_exclude_norms_biases_tokens_pos():
    from engine.model import build_model
    from engine.config import debug

    m = build_model(debug().model)
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight"} <= nd
    assert "pos_embed" not in nd | d  # frozen sin-cos
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= d
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)
