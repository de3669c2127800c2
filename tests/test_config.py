import pytest

from engine.config import (PRESETS, Config, ConfigError, ModelConfig, apply_overrides, get_preset,
                           mae_vit_huge_patch14)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_valid_and_roundtrip(name):
    cfg = get_preset(name)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_paper_recipe():
    cfg = mae_vit_huge_patch14()
    m, o = cfg.model, cfg.optim
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.num_patches) == (1280, 32, 16, 14, 256)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert o.betas == (0.9, 0.95) and o.weight_decay == 0.05 and o.base_lr == 1.5e-4 and o.warmup_epochs == 40
    assert m.norm_pix_loss and m.mask_ratio == 0.75
    assert o.scaled_lr(4096) == pytest.approx(1.5e-4 * 16)
    assert get_preset("vit-h") == cfg


def test_overrides_convert_types():
    cfg = apply_overrides(get_preset("debug"), {"optim.lr": "1e-3", "model.mask_ratio": "0.9",
                                               "model.norm_pix_loss": "false", "optim.betas": "0.8,0.99"})
    assert cfg.optim.lr == 1e-3 and cfg.model.mask_ratio == 0.9 and cfg.model.norm_pix_loss is False
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.scaled_lr(4096) == 1e-3


@pytest.mark.parametrize("over,needle", [
    ({"model.mask_ratio": "1.0"}, "mask ratio must be in [0, 1)"),
    ({"model.mask_ratio": "0.99"}, "leaves no visible patch"),
    ({"model.img_size": "30"}, "not divisible by model.patch_size"),
    ({"model.num_heads": "3"}, "not divisible by model.num_heads"),
    ({"optim.lrr": "1"}, "unknown option --optim.lrr"),
    ({"nosuch.x": "1"}, "unknown option --nosuch.x"),
    ({"train.batch_size": "abc"}, "bad value 'abc' for --train.batch_size"),
    ({"train.batch_size": "0"}, "train.batch_size must be a positive integer"),
    ({"data.backend": "ffcv"}, "data.backend must be"),
])
def test_bad_values_name_the_problem(over, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("debug"), over)
    assert needle in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'vit-z'"):
        get_preset("vit-z")


def test_len_keep():
    m = ModelConfig(mask_ratio=0.75)
    assert m.len_keep == 49 and m.num_patches == 196


def test_a_run_writes_its_resolved_config_and_config_runs_it_again(tmp_path):
    """config.toml in the run directory holds every field; `--config` of it gives the same config back, and a
    dotted override on the command line still wins."""
    from engine.config import Config, read_toml
    from engine.cli.options import build_config
    from engine.trainer import Trainer

    from conftest import debug_cfg

    cfg = debug_cfg(tmp_path, **{"train.max_steps": 1, "model.mask_ratio": 0.6, "data.scale": "0.3,0.9"})
    tr = Trainer(cfg, log=lambda m: None)
    f = tmp_path / "config.toml"
    data = read_toml(f)
    assert data["preset"] == "debug" and data["model"]["mask_ratio"] == 0.6 and data["data"]["scale"] == [0.3, 0.9]
    assert data["train"]["compile"] is False and cfg.train.compile is None  # what auto chose, not auto
    again = build_config(None, [], str(f))
    assert again.to_dict() == tr.cfg.to_dict() and isinstance(again, Config)
    assert build_config(None, ["--model.mask_ratio", "0.9"], str(f)).model.mask_ratio == 0.9


def test_unknown_keys_are_named_with_the_nearest_valid_one(tmp_path, capsys):
    from engine.cli import main

    assert main(["pretrain", "--model.mask_ration", "0.8"]) == 2
    assert "unknown option --model.mask_ration (did you mean --model.mask_ratio?)" in capsys.readouterr().err
    bad = tmp_path / "c.toml"
    bad.write_text('preset = "debug"\n[train]\nbatch_sise = 8\n')
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert f"{bad}: unknown key train.batch_sise (did you mean train.batch_size?)" in capsys.readouterr().err
    bad.write_text('[trian]\nbatch_size = 8\n')
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert "unknown key 'trian' (did you mean 'train'?)" in capsys.readouterr().err
    bad.write_text('[train\nbatch_size = 8\n')
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_help_shows_the_named_presets_defaults(capsys):
    from engine.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--preset", "vit-h", "--help"])
    out = capsys.readouterr().out
    assert "--model.embed_dim (default 1280)" in out and "--model.patch_size (default 14)" in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--model.embed_dim (default 64)" in capsys.readouterr().out  # debug, the default preset


def test_resume_keeps_the_data_backend_it_started_with(tmp_path):
    from engine.trainer import Trainer

    from conftest import debug_cfg

    Trainer(debug_cfg(tmp_path, **{"train.max_steps": 2, "data.backend": "torchvision"}), log=lambda m: None).fit()
    logs = []
    t = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 4, "data.backend": "auto"}), resume=True, log=logs.append)
    assert t.loader.name == "torchvision" and any("the torchvision loader the run started with" in x for x in logs)
    logs.clear()
    t = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 4, "data.backend": "synthetic"}), resume=True,
                log=logs.append)
    assert t.loader.name == "synthetic" and any("continuing with synthetic as asked" in x for x in logs)


def test_a_resume_on_another_world_size_keeps_or_refuses_the_global_batch():
    """Engine.trainer's rule, without processes: 2 ranks x 8 -> 1 rank keeps 16 as 8 x 2 accumulation; -> 3 ranks is
    refused naming both world sizes and the override; `follow` keeps the config as given, with a note."""
    from types import SimpleNamespace

    from engine.config import ConfigError, debug
    from engine.trainer import Trainer

    meta = {"world": 2, "config": {"train": {"batch_size": 8, "accum_steps": 1}}}

    def resume_on(world, batch, accum=1, mode="keep"):
        cfg = debug()
        cfg.train.batch_size, cfg.train.accum_steps, cfg.train.on_world_change = batch, accum, mode
        logs = []
        fake = SimpleNamespace(world=world, cfg=cfg, is_main=True, log=logs.append)
        Trainer._keep_global_batch(fake, meta)
        return cfg.train.batch_size, cfg.train.accum_steps, logs

    assert resume_on(1, 8)[:2] == (8, 2)
    assert resume_on(1, 4)[:2] == (8, 2)  # a smaller batch given: the saved per-device batch is known to fit
    assert resume_on(4, 8)[:2] == (4, 1)
    assert resume_on(2, 16)[:2] == (16, 1)  # the same world size: the batch as given (a deliberate change)
    b, a, logs = resume_on(1, 16)
    assert (b, a) == (16, 1) and logs == []  # already the saved global batch
    with pytest.raises(ConfigError, match=r"saved on 2 rank\(s\) \(global batch 16 = 8 x 1 x 2\) on 3 rank\(s\).*"
                                          r"world size that divides it.*on_world_change follow"):
        resume_on(3, 8)
    b, a, logs = resume_on(1, 8, mode="follow")
    assert (b, a) == (8, 1) and "global batch 8 instead of 16" in logs[0]
