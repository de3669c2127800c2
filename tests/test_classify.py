"""Fine-tuning and linear probing as runs (engine/classify.py, `mae finetune | linprobe`): resume bit for bit,
best.pt, validation over ranks exactly once, the recipes' presets, a change of resolution, fp16 loss scaling."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import checkpoint as ckpt
from engine.cli import main
from engine.config import (CLASSIFY_PRESETS, PAPER_DIFFERS, ClassifyConfig, ConfigError, apply_overrides,
                           get_classify_preset)

FAST = ["--data.num_workers", "0", "--train.tensorboard", "false", "--train.progress", "false", "--train.device",
        "cpu", "--train.precision", "fp32"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pipelines.labelled import export_digits

    root = tmp_path_factory.mktemp("digits")
    export_digits(str(root), 32)
    return root


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory):
    """A debug MAE pretrained briefly on the digits (its weights, not its quality, are what the runs start from)."""
    run = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--preset", "debug", "--data", str(digits / "train"), "--run-dir", str(run),
                 "--data.backend", "torchvision", "--train.max_steps", "20", "--train.vis_every", "0",
                 "--train.log_every", "20", *FAST]) == 0
    return ckpt.latest_checkpoint(run)


def classify(protocol, digits, run_dir, *extra, checkpoint=None):
    src = ["--checkpoint", str(checkpoint)] if checkpoint else ["--random"]
    return main([protocol, *src, "--train", str(digits / "train"), "--val", str(digits / "val"), "--run-dir",
                 str(run_dir), *FAST, *extra])


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_model(run_dir):
    return torch.load(ckpt.latest_checkpoint(run_dir), map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------------------
# resume: the same run, stopped and continued, ends bit for bit where the uninterrupted one does


@pytest.mark.parametrize("protocol,extra", [
    ("finetune", ["--task.auto_augment", "rand-m9-mstd0.5-inc1", "--task.reprob", "0.25", "--task.mixup", "0.8",
                  "--task.cutmix", "1.0", "--task.drop_path", "0.1"]),
    ("linprobe", ["--optim.base_lr", "1.0"]),
])
def test_a_run_stopped_at_an_epoch_and_resumed_ends_bit_for_bit_as_the_uninterrupted_one(
        protocol, extra, digits, pretrained, tmp_path):
    common = ["--train.epochs", "2", "--train.batch_size", "64", "--train.log_every", "5", "--train.ckpt_every",
              "100", *extra]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert classify(protocol, digits, whole, *common, checkpoint=pretrained) == 0
    assert classify(protocol, digits, parts, *common, "--train.max_steps", "19", checkpoint=pretrained) == 0
    assert ckpt.latest_checkpoint(parts).name == "ckpt_00000019.pt"
    assert main([protocol, "--run-dir", str(parts), "--resume", "--train.max_steps", "0", *FAST]) == 0
    a, b = final_model(whole), final_model(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (whole, parts))
    assert (ra["top1"], ra["top5"], ra["history"]) == (rb["top1"], rb["top5"], rb["history"])
    # the training records after the resume are the uninterrupted run's, value for value
    after = lambda recs: {r["step"]: (r["loss"], r["grad_norm"]) for r in recs if "loss" in r and r["step"] > 20}
    assert after(records(whole)) == after(records(parts)) and after(records(whole))


def test_best_pt_holds_the_best_validation_and_loads_into_the_classifier(digits, pretrained, tmp_path):
    from engine.classify import ClassifyRun

    assert classify("finetune", digits, tmp_path, "--train.epochs", "3", "--train.batch_size", "64",
                    checkpoint=pretrained) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["best"]["top1"] == max(h["val_top1"] for h in res["history"]) == res["best_top1"]
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert best["classes"] == [str(i) for i in range(10)]
    vals = [r for r in records(tmp_path) if "val_top1" in r]
    assert [round(r["val_top1"], 6) for r in vals] == [round(h["val_top1"], 6) for h in res["history"]]
    assert all(r["val_top5"] >= r["val_top1"] for r in vals)
    cfg = ClassifyConfig.from_dict(best["config"])
    run = ClassifyRun(apply_overrides(cfg, {"train.run_dir": str(tmp_path / "again"), "task.checkpoint": ""}))
    run.model.load_state_dict(best["model"])  # strict: the same classifier
    run.close()


def test_the_linear_probe_trains_the_head_only_and_a_pretrained_encoder_is_untouched(digits, pretrained, tmp_path):
    assert classify("linprobe", digits, tmp_path, "--train.epochs", "1", "--train.batch_size", "64",
                    checkpoint=pretrained) == 0
    assert "`mae linprobe --config FILE` runs it again" in (tmp_path / "config.toml").read_text()
    after = final_model(tmp_path)
    before = ckpt.full_model_state(pretrained)
    for k, v in after.items():
        if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed")):
            assert torch.equal(v, before[k]), k
    assert not torch.equal(after["head.1.weight"], torch.zeros_like(after["head.1.weight"]))


def test_resuming_with_the_other_protocol_or_another_architecture_is_refused(digits, pretrained, tmp_path, capsys):
    assert classify("finetune", digits, tmp_path, "--train.max_steps", "2", checkpoint=pretrained) == 0
    args = ["--run-dir", str(tmp_path), "--resume", "--checkpoint", str(pretrained), "--train", str(digits / "train"),
            "--val", str(digits / "val"), *FAST]
    assert main(["linprobe", *args]) == 2
    assert "config.toml is the configuration of a `mae finetune` run; this is `mae linprobe`" in capsys.readouterr().err
    assert main(["linprobe", "--preset", "debug", *args]) == 2  # past the run's config: its checkpoint refuses
    assert "ckpt_00000002.pt is a finetune checkpoint; this is mae linprobe" in capsys.readouterr().err
    assert main(["finetune", "--run-dir", str(tmp_path), "--resume", "--model.embed_dim", "128", *FAST]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_bad_input_is_one_line_naming_it(digits, tmp_path, capsys):
    assert main(["finetune", "--random", "--run-dir", str(tmp_path / "a"), *FAST]) == 2
    assert "needs labelled images: --train DIR and --val DIR" in capsys.readouterr().err
    assert main(["finetune", "--train", str(digits / "train"), "--val", str(digits / "val"), "--run-dir",
                 str(tmp_path / "b"), *FAST]) == 2
    assert "give --checkpoint CKPT" in capsys.readouterr().err
    other = tmp_path / "other"
    for c in ("cat", "dog"):
        (other / c).mkdir(parents=True)
        (other / c / "x.png").write_bytes((digits / "val" / "0" / next(iter(sorted(
            p.name for p in (digits / "val" / "0").iterdir())))).read_bytes())
    assert main(["finetune", "--random", "--train", str(digits / "train"), "--val", str(other), "--run-dir",
                 str(tmp_path / "c"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "has the classes [cat, dog]" in err and "must be the same folders" in err
    assert main(["finetune", "--random", "--train", str(digits / "train"), "--val", str(digits / "val"), "--run-dir",
                 str(tmp_path / "d"), "--train.batch_size", "33", "--train.max_steps", "1", "--task.mixup", "0.8",
                 *FAST]) == 2
    assert "train.batch_size=33 must be even" in capsys.readouterr().err
    assert main(["finetune", "--random", "--train", str(digits / "train"), "--val", str(digits / "val"), "--run-dir",
                 str(tmp_path / "f"), "--data.backend", "dali", *FAST]) == 2
    assert "data.backend=dali: mae finetune reads labelled folders through the torchvision pipeline" in \
        capsys.readouterr().err
    assert main(["finetune", "--random", "--run-dir", str(tmp_path / "e"), "--train.cuda_graph", "true", *FAST]) == 2
    assert "train.cuda_graph=True does not apply to fine-tuning" in capsys.readouterr().err


def test_mae_eval_linprobe_is_the_run_under_its_first_option_names(digits, pretrained, tmp_path):
    out = tmp_path / "lin.json"
    assert main(["eval", "linprobe", "--checkpoint", str(pretrained), "--train", str(digits / "train"), "--val",
                 str(digits / "val"), "--epochs", "1", "--batch-size", "64", "--lr", "1.0", "--pool", "gap",
                 "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"] == "linprobe" and res["epochs"] == 1 and 0 <= res["top1"] <= 1
    assert res["val_samples"] == 539 and res["weights"] == "mae"


# ----------------------------------------------------------------------------------------------------------
# validation over ranks: each sample exactly once, every rank the same number of batches


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 9))
def test_the_ranks_validation_shares_hold_every_sample_once_and_are_equally_long(n, world):
    from pipelines.labelled import shard_for_eval

    shares = [shard_for_eval(n, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world)
    real = sorted(i for s in shares for i in s if i >= 0)
    assert real == list(range(n))
    assert all(i == -1 for s in shares for i in s if i < 0)


def test_padding_of_a_validation_share_is_not_counted(digits, tmp_path):
    """Two ranks' shares, each validated alone and summed, count the 539 digits once (padding has label -1)."""
    from engine.classify import ClassifyRun
    from engine.config import get_classify_preset

    cfg = apply_overrides(get_classify_preset("debug", "linprobe"), {
        "task.train": str(digits / "train"), "task.val": str(digits / "val"), "data.num_workers": "0",
        "train.device": "cpu", "train.batch_size": "100", "train.run_dir": str(tmp_path)})
    run = ClassifyRun(cfg)
    try:
        whole = [(x, y) for x, y in run.val_loader.val_batches()]
        n_whole = sum(int((y >= 0).sum()) for _, y in whole)
        halves = []
        for rank in range(2):
            run.val_loader.rank, run.val_loader.world = rank, 2
            halves += [y for _, y in run.val_loader.val_batches()]
        labels = torch.cat(halves)
        assert n_whole == 539 and int((labels >= 0).sum()) == 539 and int((labels < 0).sum()) == 1
        # validate(): each rank's share scored alone; the hits add up to the whole set's, over 270 + 269 samples
        run.val_loader.rank, run.val_loader.world = 0, 1
        whole_top1, whole_top5 = run.validate()
        hits = []
        for rank, n in ((0, 270), (1, 269)):
            run.val_loader.rank, run.val_loader.world = rank, 2
            top1, top5 = run.validate()
            assert top1 * n == pytest.approx(round(top1 * n), abs=1e-6)
            hits.append((round(top1 * n), round(top5 * n)))
        assert sum(h[0] for h in hits) == round(whole_top1 * 539) and sum(h[1] for h in hits) == round(whole_top5 * 539)
        with torch.no_grad():  # and the whole set's top-1 is the model's, sample by sample
            run.model.eval()
            right = sum(int((run.model(x).argmax(-1) == y).sum()) for x, y in run.val_loader.epoch(0))
        assert round(whole_top1 * 539) == right
    finally:
        run.close()


# ----------------------------------------------------------------------------------------------------------
# the recipes


RECIPES = {  # the reference code's FINETUNE.md / LINPROBE.md, as the issue lists them
    "finetune_vit_b16": dict(base_lr=5e-4, layer_decay=0.65, epochs=100, drop_path=0.1),
    "finetune_vit_l16": dict(base_lr=1e-3, layer_decay=0.75, epochs=50, drop_path=0.2),
    "finetune_vit_h14": dict(base_lr=1e-3, layer_decay=0.75, epochs=50, drop_path=0.3),
}


@pytest.mark.parametrize("name", RECIPES)
def test_the_finetuning_presets_are_the_published_recipes(name):
    c, want = get_classify_preset(name), RECIPES[name]
    assert (c.optim.base_lr, c.task.layer_decay, c.train.epochs, c.task.drop_path) == (
        want["base_lr"], want["layer_decay"], want["epochs"], want["drop_path"])
    assert c.train.batch_size * c.train.accum_steps * 8 == 1024  # on 8 GPUs
    assert (c.optim.warmup_epochs, c.optim.betas, c.optim.weight_decay) == (5, (0.9, 0.999), 0.05)
    t = c.task
    assert (t.auto_augment, t.reprob, t.mixup, t.cutmix, t.smoothing, t.pool, t.optimizer, t.crop_pct) == (
        "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1, "gap", "adamw", 0.875)
    assert round(c.model.img_size / t.crop_pct) == 256 and c.model.img_size == 224


@pytest.mark.parametrize("name", ["linprobe_vit_b16", "linprobe_vit_l16", "linprobe_vit_h14"])
def test_the_linear_probe_presets_are_the_published_recipe(name):
    c = get_classify_preset(name)
    assert (c.task.optimizer, c.optim.base_lr, c.train.epochs, c.optim.warmup_epochs, c.optim.weight_decay) == (
        "lars", 0.1, 90, 10, 0.0)
    assert c.train.batch_size * c.train.accum_steps * 8 == 16384 and c.task.pool == "cls"
    assert (c.task.mixup, c.task.cutmix, c.task.auto_augment, c.task.smoothing) == (0, 0, "", 0)


def test_every_classify_preset_builds_and_names_its_architecture():
    from engine.config import PRESETS

    for name, make in CLASSIFY_PRESETS.items():
        c = make()
        assert c.preset == name and c.task.protocol == name.split("_")[0]
        arch = {"b16": "mae_vit_base_patch16", "l16": "mae_vit_large_patch16", "h14": "mae_vit_huge_patch14",
                "debug": "debug"}[name.split("_")[-1] if not name.endswith("448") else "h14"]
        assert c.model.embed_dim == PRESETS[arch]().model.embed_dim
    assert get_classify_preset("finetune_vit_h14_448").model.img_size == 448


def test_help_names_the_papers_value_where_the_code_differs(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--preset", "vit-b", "--help"])
    out = capsys.readouterr().out
    assert "optim.base_lr paper 0.001" in out and "task.layer_decay paper 0.75" in out
    assert "--task.layer_decay (default 0.65)" in out
    assert set(PAPER_DIFFERS) <= set(CLASSIFY_PRESETS)


def test_the_architecture_of_a_checkpoint_picks_the_preset(pretrained):
    from engine.cli.classify import preset_for_checkpoint

    assert preset_for_checkpoint("finetune", str(pretrained)) == ("finetune_debug", None)
    assert preset_for_checkpoint("linprobe", str(pretrained)) == ("linprobe_debug", None)


def test_pretrainings_levers_that_a_classifier_lacks_are_refused():
    with pytest.raises(ConfigError, match="train.attention='flash' does not apply"):
        apply_overrides(get_classify_preset("finetune_debug"), {"train.attention": "flash"})
    with pytest.raises(ConfigError, match="task.last_blocks=3 is more than the encoder's 2 blocks"):
        apply_overrides(get_classify_preset("finetune_debug"), {"task.last_blocks": "3"})


# ----------------------------------------------------------------------------------------------------------
# resolution


def test_position_embeddings_resample_as_timms_resample_abs_pos_embed():
    from timm.layers import resample_abs_pos_embed

    from engine.model import resample_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 32)
    for grid in [(28, 28), (16, 16), (7, 7), (12, 20)]:
        assert torch.equal(resample_pos_embed(pe, grid),
                           resample_abs_pos_embed(pe, list(grid), num_prefix_tokens=1, antialias=False))
    assert resample_pos_embed(pe, (14, 14)) is pe


def test_weights_of_another_resolution_load_with_resampled_position_embeddings(pretrained):
    from engine.config import debug
    from engine.model import build_model, resample_pos_embed

    import dataclasses

    mae = build_model(dataclasses.replace(debug().model, img_size=48))
    info = ckpt.import_weights(mae, pretrained)
    assert info["resized"] == ["pos_embed: 8x8 -> 12x12", "decoder_pos_embed: 8x8 -> 12x12"]
    src = ckpt.full_model_state(pretrained)
    assert torch.equal(mae.pos_embed.detach(), resample_pos_embed(src["pos_embed"], (12, 12)))
    assert torch.equal(mae.blocks[0].attn.qkv.weight.detach(), src["blocks.0.attn.qkv.weight"])


def test_a_32_to_48_pixel_finetune_runs_through_the_resampled_embedding(digits, pretrained, tmp_path, capsys):
    assert classify("finetune", digits, tmp_path, "--model.img_size", "48", "--train.max_steps", "3",
                    checkpoint=pretrained) == 0
    out = capsys.readouterr().out
    assert "position embeddings pos_embed: 8x8 -> 12x12" in out and "48px" in out
    assert final_model(tmp_path)["pos_embed"].shape == (1, 145, 64)


# ----------------------------------------------------------------------------------------------------------
# fp16 with dynamic loss scaling


def _fp16_step(loss_at, opt=torch.optim.AdamW):
    from engine.mixed import LossScaler
    from engine.step import TrainStep

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = opt(model.parameters(), lr=0.1)
    calls = iter(loss_at)

    def forward(x, _ratio, y):
        scale = next(calls)
        return ((model(x) - y) ** 2).mean() * scale, None, None

    scaler = LossScaler(torch.device("cpu"), init_scale=2.0**10, growth_interval=2)
    step = TrainStep(model, opt, device=torch.device("cpu"), amp_dtype=torch.float16, forward=forward, scaler=scaler)
    return model, step, scaler


def test_an_fp16_overflow_skips_the_update_halves_the_scale_and_is_counted():
    model, step, scaler = _fp16_step([1.0, float("inf"), 1.0, 1.0, 1.0])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    flags, scales = [], []
    for i in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        _, finite = step([(x, y)])
        flags.append(bool(finite))
        scales.append(float(scaler.scale))
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert changed == flags[-1], i
    assert flags == [True, False, True, True, True]
    assert scales == [2.0**10, 2.0**9, 2.0**9, 2.0**10, 2.0**10]  # halved, then doubled after 2 good steps
    assert int(scaler.overflows) == 1
    state = scaler.state_dict()
    other = _fp16_step([1.0])[2]
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_fp16_gradients_reach_the_optimizer_at_their_true_size():
    """The scaled backward, unscaled: the same update as an unscaled fp32 step (SGD: Adam would hide a scale)."""
    from engine.step import TrainStep

    model, step, _ = _fp16_step([1.0], torch.optim.SGD)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_step = TrainStep(ref, ref_opt, device=torch.device("cpu"), amp_dtype=torch.float16,
                         forward=lambda x, _r, y: (((ref(x) - y) ** 2).mean(), None, None))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    step([(x, y)])
    ref_step([(x, y)])
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # a power-of-two scale, undone: the same bits


def test_fp16_pretraining_logs_its_scale_and_resumes_with_it(tmp_path):
    common = ["--preset", "debug", "--train.precision", "fp16", "--train.device", "cpu", "--data.num_workers", "0",
              "--train.tensorboard", "false", "--train.progress", "false", "--train.vis_every", "0",
              "--train.log_every", "2", "--data.backend", "torchvision", "--run-dir", str(tmp_path)]
    assert main(["pretrain", *common, "--train.max_steps", "4"]) == 0
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path))
    assert meta["loss_scale"]["scale"] == 2.0**16 and meta["loss_scale"]["overflows"] == 0
    recs = records(tmp_path)
    assert recs[-1]["loss_scale"] == 2.0**16 and recs[-1]["overflows"] == 0
    path = ckpt.latest_checkpoint(tmp_path)  # the scale a run had reached (set by hand here) is the one it resumes with
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj["loss_scale"] = {"scale": 1024.0, "growth_tracker": 3, "overflows": 5}
    torch.save(obj, path)
    assert main(["pretrain", *common, "--resume", "--train.max_steps", "6"]) == 0
    last = records(tmp_path)[-1]
    assert (last["step"], last["loss_scale"], last["overflows"]) == (6, 1024.0, 5)


def test_fp16_is_refused_with_the_captured_step():
    from engine.parallel import DistContext
    from engine.levers import check_levers
    from engine.config import debug

    cfg = apply_overrides(debug(), {"train.precision": "fp16", "train.cuda_graph": "true"})
    with pytest.raises(ConfigError, match="fp16: its loss scaler is not captured"):
        check_levers(cfg, DistContext(), torch.device("cpu"), strict=False)


# ----------------------------------------------------------------------------------------------------------
# data


def test_an_unreadable_file_is_replaced_by_the_next_one_with_that_files_label(tmp_path, digits):
    from engine.config import DataConfig
    from pipelines.labelled import LabelledFiles

    good = sorted((digits / "val" / "3").iterdir())[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    ds = LabelledFiles([str(bad), str(good)], [7, 3], 32, DataConfig(), 0, train=False)
    x, label = ds[(0, 0)]
    assert label == 3 and x.shape == (3, 32, 32)


def test_the_recipe_augmentation_is_a_function_of_the_sample_and_leaves_the_global_generators_alone(digits):
    import random

    import numpy as np

    from engine.config import DataConfig
    from pipelines.labelled import LabelledFiles

    files = [str(p) for p in sorted((digits / "val" / "5").iterdir())[:2]]
    ds = LabelledFiles(files, [5, 5], 32, DataConfig(scale=(0.08, 1.0)), 0, train=True,
                       auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a, b, c = ds[(0, 0)][0], ds[(0, 0)][0], ds[(1, 0)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_randaugment_posterize_at_zero_bits_gives_a_black_image():
    from PIL import Image

    from pipelines.labelled import _posterize

    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert _posterize(img, 0).tobytes() == bytes(4 * 4 * 3)
    assert _posterize(img, 8) is img
    assert _posterize(img, 1).tobytes() == bytes([128, 0, 0] * 16)


# ----------------------------------------------------------------------------------------------------------
# torchrun: two gloo ranks fine-tune as one process does with the same global batch


def test_a_two_rank_finetune_equals_a_one_rank_one_with_the_same_global_batch(digits, pretrained, tmp_path):
    """FSDP2 on 2 CPU processes, 16 images each, stopped at step 3 and resumed, against one process with 32: the same
    losses (to float rounding: the gradients are averaged in another order) and the same validation (each digit
    counted once over the ranks); the cls token and position embeddings, parameters of the classifier that FSDP2
    shards, train on both.
    Mixup and drop path draw per rank, so they are off here; the per-sample crop and flip are the same either way."""
    import os
    import subprocess
    import sys

    same = ["--checkpoint", str(pretrained), "--train", str(digits / "train"), "--val", str(digits / "val"), *FAST,
            "--train.max_steps", "6", "--train.log_every", "1", "--task.mixup", "0", "--task.cutmix", "0",
            "--task.drop_path", "0", "--task.auto_augment", "", "--task.eval_every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["finetune", *same, "--train.batch_size", "32", "--run-dir", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.cli",
           "finetune", *same, "--train.batch_size", "16", "--run-dir", str(two)]
    for extra in (["--train.max_steps", "3"], ["--resume"]):  # stopped halfway, resumed from the sharded checkpoint
        r = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        assert "FSDP2 over 2 ranks" in r.stdout
    assert "resumed from" in r.stdout
    a, b = records(one), records(two)
    la = {x["step"]: x["loss"] for x in a if "loss" in x}
    lb = {x["step"]: x["loss"] for x in b if "loss" in x}
    assert la.keys() == lb.keys() == set(range(1, 7))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), s
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert ra["top1"] == pytest.approx(rb["top1"], abs=1 / 539 + 1e-9) and rb["world"] == 2
    assert rb["val_samples"] == 539
    assert (two / "ckpt_00000006.dcp").is_dir()


def test_the_finetune_benchmark_runs_both_steps_and_writes_its_report(tmp_path):
    from benchmarks import finetune_speed

    assert finetune_speed.main(["--models", "debug", "--configs", "engine,reference", "--steps", "1", "--warmup", "1",
                                "--batch", "4", "--classes", "10", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("finetune_cpu_*.json")).read_text())
    rows = {(r["protocol"], r["config"]): r for r in report["rows"]}
    assert set(rows) == {(p, c) for p in ("finetune", "linprobe") for c in ("engine", "reference")}
    assert all(r["status"] == "ok" and r["img_s"] > 0 and r["batch"] == 4 for r in rows.values())
    assert "CPU" in next(tmp_path.glob("finetune_cpu_*.md")).read_text()


def test_mae_import_at_another_resolution_resamples_the_position_embeddings(pretrained, tmp_path, capsys):
    out = tmp_path / "at48.pt"
    assert main(["import", str(pretrained), "--preset", "debug", "--model.img_size", "48", "--out", str(out)]) == 0
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert obj["model"]["pos_embed"].shape == (1, 145, 64) and obj["config"]["model"]["img_size"] == 48
    assert obj["model"]["decoder_pos_embed"].shape == (1, 145, 32)


def test_a_packed_labelled_set_trains_and_validates_as_its_folder_does(digits, tmp_path, capsys):
    """`mae data pack --labels` shards (labels in {key}.cls members): the same validation top-1 as the folder (the
    same images, another order), and a fine-tune reads its training images from them."""
    packed = {}
    for split in ("train", "val"):
        packed[split] = tmp_path / f"{split}_packed"
        assert main(["data", "pack", str(digits / split), str(packed[split]), "--labels", "--per-shard", "200"]) == 0
    common = ["--random", "--train.max_steps", "2", "--train.batch_size", "32", *FAST]
    assert main(["linprobe", *common, "--train", str(digits / "train"), "--val", str(digits / "val"), "--run-dir",
                 str(tmp_path / "folder")]) == 0
    assert main(["linprobe", *common, "--train", str(digits / "train"), "--val", str(packed["val"]), "--run-dir",
                 str(tmp_path / "shards")]) == 0
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("folder", "shards"))
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"] and b["val_samples"] == 539
    assert main(["finetune", *common, "--train", str(packed["train"]), "--val", str(packed["val"]), "--run-dir",
                 str(tmp_path / "both")]) == 0
    unlabelled = tmp_path / "unlabelled"
    assert main(["data", "pack", str(digits / "val"), str(unlabelled), "--per-shard", "200"]) == 0
    capsys.readouterr()
    assert main(["finetune", *common, "--train", str(unlabelled), "--val", str(packed["val"]), "--run-dir",
                 str(tmp_path / "no")]) == 2
    assert "is a packed set without labels; pack the class folders again with `mae data pack SRC OUT --labels`" in \
        capsys.readouterr().err


def test_a_non_square_finetune_resamples_to_the_rectangular_grid_and_resumes(digits, pretrained, tmp_path, capsys):
    """--task.height 48 with the 32-pixel width: 48x32 inputs, a 12x8 grid of patches, position embeddings resampled
    from the checkpoint's 8x8 (as timm's resample_abs_pos_embed), and a resume of that run."""
    from timm.layers import resample_abs_pos_embed

    args = ["--task.height", "48", "--task.auto_augment", "rand-m9-mstd0.5-inc1", "--task.mixup", "0.8"]
    assert classify("finetune", digits, tmp_path, *args, "--train.max_steps", "2", checkpoint=pretrained) == 0
    out = capsys.readouterr().out
    assert "position embeddings pos_embed: 8x8 -> 12x8" in out and "48x32px" in out
    from engine.classify import build_classifier
    from engine.parallel import DistContext

    cfg = apply_overrides(get_classify_preset("finetune_debug"), {"task.height": "48",
                                                                  "task.checkpoint": str(pretrained)})
    model, info = build_classifier(cfg, 10, DistContext(), torch.device("cpu"))
    src = ckpt.full_model_state(pretrained)["pos_embed"]
    want = resample_abs_pos_embed(src, [12, 8], num_prefix_tokens=1, antialias=False)
    assert torch.equal(model.pos_embed.detach(), want) and info["resized"][0] == "pos_embed: 8x8 -> 12x8"
    assert model(torch.randn(2, 3, 48, 32)).shape == (2, 10)
    assert main(["finetune", "--run-dir", str(tmp_path), "--resume", "--train.max_steps", "4", *FAST]) == 0
    assert final_model(tmp_path)["pos_embed"].shape == (1, 97, 64)
    with pytest.raises(ConfigError, match="task.height=50 is not divisible by model.patch_size=4"):
        apply_overrides(get_classify_preset("finetune_debug"), {"task.height": "50"})


@pytest.mark.parametrize("train,aug", [(True, ""), (True, "rand-m9-mstd0.5-inc1"), (False, "")])
def test_labelled_images_come_at_a_rectangular_size(digits, train, aug):
    from engine.config import DataConfig
    from pipelines.labelled import LabelledFiles

    files = [str(sorted((digits / "val" / "1").iterdir())[0])]
    ds = LabelledFiles(files, [1], (48, 32), DataConfig(), 0, train=train, auto_augment=aug, reprob=0.25 if aug else 0)
    x, label = ds[(0, 0)]
    assert x.shape == (3, 48, 32) and label == 1


REHEARSAL = r'''
import os, sys
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from engine.classify import build_classifier, build_loss
from engine.config import apply_overrides, get_classify_preset
from engine.parallel import DistContext

world, rank, replicate, protocol = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % 8), LOCAL_WORLD_SIZE="8")
dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
cfg = apply_overrides(get_classify_preset(f"{protocol}_debug"), {"parallel.replicate": str(replicate),
                                                                  "train.device": "cpu"})
model, _ = build_classifier(cfg, 10, DistContext(rank, world, rank % 8, True), torch.device("cpu"))
shard, index = world // replicate, rank % (world // replicate)
for name, p in model.named_parameters():
    assert isinstance(p, DTensor), name
    rows, chunk = p.shape[0], -(-p.shape[0] // shard)
    assert p.to_local().shape[0] == max(0, min(chunk, rows - index * chunk)), name
mixup, criterion = build_loss(cfg, 10)
with FakeTensorMode(allow_non_fake_inputs=True):
    loss = criterion(model(torch.randn(4, 3, 32, 32)).float(), torch.randint(0, 10, (4,)))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and p.to_local().numel():  # a rank past a parameter's rows holds none of it
            assert p.grad is not None and p.grad.to_local().shape == p.to_local().shape, name
trained = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
print("ok", trained)
'''


@pytest.mark.parametrize("world, rank, replicate, protocol, trained", [
    (8, 3, 1, "finetune", "['blocks', 'cls_token', 'fc_norm', 'head', 'patch_embed', 'pos_embed']"),
    (64, 37, 8, "finetune", "['blocks', 'cls_token', 'fc_norm', 'head', 'patch_embed', 'pos_embed']"),
    (16, 5, 2, "linprobe", "['head']"),
])
def test_the_classifier_shards_as_fsdp2_and_hsdp_on_a_fake_process_group(world, rank, replicate, protocol, trained):
    """Rank `rank` of a `world`-rank fine-tune or probe, built as torchrun would on a fake process group: every
    parameter a DTensor holding its chunk of rows (FSDP2 over the world, or HSDP `replicate` x shards), and a forward
    and backward on fake tensors leaving each trained parameter a gradient the shape of its shard."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", REHEARSAL, str(world), str(rank), str(replicate), protocol],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"ok {trained}"


def test_activation_checkpointing_recomputes_the_same_drop_path(pretrained):
    """Drop path draws random numbers in the blocks: a recomputed block must draw what its forward drew, or its
    gradients are another network's. With checkpointing, the gradients equal those without."""
    from engine.classify import build_classifier
    from engine.parallel import DistContext

    grads = []
    for ckpting in ("false", "true"):
        cfg = apply_overrides(get_classify_preset("finetune_debug"), {
            "task.checkpoint": str(pretrained), "task.drop_path": "0.5", "train.activation_checkpointing": ckpting})
        model, _ = build_classifier(cfg, 10, DistContext(), torch.device("cpu"))
        model.train()
        torch.manual_seed(3)
        x = torch.randn(8, 3, 32, 32)
        model.features(x).square().sum().backward()  # the features: the fresh head's 2e-5 weights would hide it
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
