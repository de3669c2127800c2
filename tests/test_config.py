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
