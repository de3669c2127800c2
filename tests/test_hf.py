"""Hugging Face ViTMAEForPreTraining weights in and out: the same weights and noise give the same loss, logits and
mask in both (fp32, 1e-5); a round trip is bit-exact; both of transformers' key layouts import. Nothing is
downloaded: the Hugging Face model is built from a config."""

import json

import pytest
import torch

from engine import checkpoint as ckpt
from engine.cli import main
from engine.config import ModelConfig
from engine.hf import from_hf_state, to_hf_state
from engine.model import build_model

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

M = ModelConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                decoder_num_heads=4, norm_pix_loss=True)


def _ours(seed=0):
    torch.manual_seed(seed)
    model = build_model(M)
    with torch.no_grad():  # not the initial values: every tensor distinct, biases and norms included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _compare(ours, hf, n=3):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(n, 3, 32, 32, generator=g)
    noise = torch.rand(n, M.num_patches, generator=g)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, M.mask_ratio, noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def _save_ckpt(model, path):
    from engine.config import debug

    cfg = debug()
    cfg.model = M
    ckpt.atomic_torch_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)


def test_export_loads_in_transformers_with_the_same_outputs(tmp_path):
    ours = _ours()
    _save_ckpt(ours, tmp_path / "c.pt")
    assert main(["export", str(tmp_path / "c.pt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "vit_mae" and cfg["layer_norm_eps"] == 1e-6 and cfg["norm_pix_loss"] is True
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _compare(ours, hf.eval())


def test_import_of_a_save_pretrained_directory(tmp_path, capsys):
    torch.manual_seed(3)
    c = ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32,
                     patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                     decoder_intermediate_size=128, layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=0.75)
    hf = ViTMAEForPreTraining(c).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "o.pt")]) == 0
    assert "imported" in capsys.readouterr().out
    obj = ckpt.load_checkpoint(tmp_path / "o.pt")
    ours = build_model(ModelConfig(**obj["config"]["model"]))
    ckpt.load_model_state(ours, obj["model"], tmp_path / "o.pt")
    _compare(ours.eval(), hf)


def test_round_trip_is_bit_exact_in_both_layouts(tmp_path):
    sd = _ours().state_dict()
    released = to_hf_state(sd)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in released
    back = from_hf_state(released)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # transformers 5's names for the same tensors
    v5 = {k.replace("vit.encoder.layer.", "vit.layers.").replace("attention.attention.query", "attention.q_proj")
          .replace("attention.attention.key", "attention.k_proj").replace("attention.attention.value", "attention.v_proj")
          .replace("attention.output.dense", "attention.o_proj").replace("intermediate.dense", "mlp.fc1")
          .replace(".output.dense", ".mlp.fc2"): v for k, v in released.items()}
    back5 = from_hf_state(v5)
    assert all(torch.equal(back5[k], sd[k]) for k in sd)


def test_refusals_name_the_problem(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "vit_mae", "hidden_act": "relu",
                                                             "layer_norm_eps": 1e-6}))
    torch.save({"x": torch.ones(1)}, tmp_path / "hf" / "pytorch_model.bin")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds no .safetensors weights (only pickled weights" in err
    assert not (tmp_path / "o.pt").exists()
