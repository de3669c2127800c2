import pickle

import pytest
import timm
import torch

from engine import checkpoint as ckpt
from engine.config import debug
from engine.model import build_model, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16


def test_export_encoder_loads_strictly_into_timm_vit_base(tmp_path):
    torch.manual_seed(0)
    mae = mae_vit_base_patch16()
    enc = ckpt.encoder_state_dict(mae.state_dict())
    path = ckpt.atomic_torch_save(enc, tmp_path / "enc.pth")
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, pretrained=False)
    vit.load_state_dict(torch.load(path, weights_only=True), strict=True)
    # the exported encoder computes what the MAE encoder computes on all patches (mask ratio 0)
    mae.eval(), vit.eval()
    x = torch.randn(2, 3, 224, 224)
    noise = torch.arange(196, dtype=torch.float32).expand(2, -1) / 196  # identity order
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x, 0.0, noise)
        feats = vit.forward_features(x)
    assert torch.allclose(latent, feats, atol=1e-4)


@pytest.mark.parametrize("factory,name", [(mae_vit_large_patch16, "vit_large_patch16_224"),
                                          (mae_vit_huge_patch14, "vit_huge_patch14_224")])
def test_export_key_set_matches_timm_large_and_huge(factory, name):
    with torch.device("meta"):
        vit = timm.create_model(name, num_classes=0, pretrained=False)
        mae = factory()
    enc = ckpt.encoder_state_dict(mae.state_dict())
    vit.load_state_dict(enc, strict=True, assign=True)  # raises on any missing/unexpected key or shape


class _Touch:
    """Unpickling this creates a marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
def test_weights_only_loading_refuses_code(tmp_path, form):
    """A .pt whose unpickling would run code (a real torch.save archive, which torch.load without weights_only
    would execute, and a bare pickle) is refused with a line naming what it asked for, and nothing runs."""
    path = tmp_path / "evil.pt"
    marker = tmp_path / "PWNED"
    if form == "torch.save":
        torch.save({"model": {"w": torch.ones(2)}, "x": _Touch(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": _Touch(marker)}, f)
    with pytest.raises(ckpt.CheckpointError, match=r"refused .*evil.pt: it asks to call or build posix.system") as e:
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(e.value).replace(str(path), "")  # never the advice to load it unsafely


def test_reference_format_is_accepted_and_mismatch_is_listed(tmp_path):
    m = build_model(debug().model)
    sd = m.state_dict()
    torch.save({"model": sd}, tmp_path / "ref.pth")
    loaded = ckpt.model_state_from(ckpt.load_checkpoint(tmp_path / "ref.pth"), tmp_path / "ref.pth")
    m2 = build_model(debug().model)
    ckpt.load_model_state(m2, loaded, tmp_path / "ref.pth")
    assert torch.equal(m2.cls_token, m.cls_token)
    bad = dict(loaded)
    bad.pop("norm.weight")
    bad["extra"] = torch.zeros(1)
    bad["cls_token"] = torch.zeros(1, 1, 8)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model_state(m2, bad, "x.pth")
    msg = str(e.value)
    assert "missing (1): norm.weight" in msg and "unexpected (1): extra" in msg and "cls_token" in msg


def test_damaged_checkpoint_is_named(tmp_path):
    p = tmp_path / "ckpt_00000001.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=str(p)):
        ckpt.load_checkpoint(p)
