import itertools

import pytest
import torch

from engine.config import ModelConfig, debug
from engine.model import MaskedAutoencoderViT, build_model, sincos_2d_pos_embed
from kernels.loss import patchify, unpatchify


def small(**kw):
    m = debug().model
    return build_model(ModelConfig(**{**m.__dict__, **kw}))


def reference_keys(depth, decoder_depth):
    """Parameter names of the paper's reference implementation (models_mae.py)."""
    blk = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
           "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in blk]
    keys += ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
             "decoder_pos_embed"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in blk]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return set(keys)


def test_parameter_names_follow_reference():
    with torch.device("meta"):
        m = MaskedAutoencoderViT(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    assert set(m.state_dict()) == reference_keys(12, 8)
    n = sum(p.numel() for p in m.parameters())
    assert n == 111_907_840  # the reference mae_vit_base_patch16 (pos embeds included)
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


def test_forward_conventions():
    model = small()
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(imgs, 0.75)
    L, K = 64, 16
    assert pred.shape == (3, L, 4 * 4 * 3) and mask.shape == (3, L) and mask.dtype == torch.float32
    assert torch.equal(mask.sum(1), torch.full((3,), float(L - K)))  # 1 = removed
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_noise_makes_masking_reproducible_and_small_noise_is_kept():
    model = small()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    l1, p1, m1 = model(imgs, 0.75, noise)
    l2, p2, m2 = model(imgs, 0.75, noise.clone())
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and torch.equal(l1, l2)
    kept = torch.argsort(noise, dim=1)[:, :16]
    assert torch.equal(m1.gather(1, kept), torch.zeros(2, 16))


def test_encoder_sees_only_kept_patches_plus_cls():
    model = small()
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    model(torch.randn(2, 3, 32, 32), 0.75)
    assert seen == [torch.Size([2, 16 + 1, 64])]
    seen.clear()
    model(torch.randn(2, 3, 32, 32), 0.5)
    assert seen == [torch.Size([2, 32 + 1, 64])]


def test_dense_baseline_encoder_sees_all_patches():
    model = small(encoder_mask_tokens=True)
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), 0.75)
    assert seen == [torch.Size([2, 64 + 1, 64])] and "encoder_mask_token" in model.state_dict()
    loss.backward()
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0
    assert "encoder_mask_token" not in small().state_dict()


def test_kept_patch_values_do_not_affect_masked_only_loss_target_path():
    """Removed patches never reach the encoder: changing their pixels changes only the loss target."""
    model = small(norm_pix_loss=False)
    imgs = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 64)
    _, p1, mask = model(imgs, 0.75, noise)
    pix_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), 4, 3)
    imgs2 = imgs + 5.0 * pix_mask  # perturb only removed patches
    _, p2, _ = model(imgs2, 0.75, noise)
    assert torch.equal(p1, p2)


def test_mask_ratio_validation_in_forward():
    with pytest.raises(ValueError, match="mask ratio"):
        small()(torch.randn(1, 3, 32, 32), 1.0)


def test_patchify_order_and_inverse():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    x = patchify(imgs, 4)
    assert x.shape == (2, 4, 48)
    # first patch, pixel (p=0, q=1) channel c sits at (0 * 4 + 1) * 3 + c
    for c in range(3):
        assert x[0, 0, (0 * 4 + 1) * 3 + c] == imgs[0, c, 0, 1]
    # patch index 1 is the top-right patch (row-major patches)
    assert x[0, 1, 0] == imgs[0, 0, 0, 4]
    assert torch.equal(unpatchify(x, 4, 3), imgs)


def test_sincos_matches_reference_formula():
    import numpy as np

    emb = sincos_2d_pos_embed(8, 2, cls_token=True)
    assert emb.shape == (5, 8) and torch.equal(emb[0], torch.zeros(8))
    # position (h=1, w=0) -> row 1 + 1*2 + 0; first half encodes w (meshgrid(w, h)), second half h
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    w, h = 0.0, 1.0
    expect = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
    assert np.allclose(emb[3].numpy(), expect, atol=1e-7)


def test_meta_build_then_materialise():
    cfg = debug().model
    with torch.device("meta"):
        m = build_model(cfg)
    m = m.to_empty(device="cpu")
    m.init_weights()
    assert torch.isfinite(m(torch.randn(1, 3, 32, 32))[0])
    assert torch.equal(m.pos_embed[0], sincos_2d_pos_embed(64, 8))


def _saved_bytes(model, imgs, noise):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = model(imgs, 0.75, noise)
    return loss, total[0]


@pytest.mark.parametrize("depth, decoder_depth, settings", [
    (4, 1, ((0, 0), (2, 0), (4, 0))),  # encoder blocks
    (2, 4, ((0, 0), (0, 2), (0, 4), (2, 4))),  # decoder blocks, then both
])
def test_partial_activation_checkpointing_same_gradients_less_saved(depth, decoder_depth, settings):
    from engine.config import ModelConfig
    from engine.levers import apply_activation_checkpointing

    cfg = ModelConfig(img_size=32, patch_size=4, embed_dim=64, depth=depth, num_heads=4, decoder_embed_dim=32,
                      decoder_depth=decoder_depth, decoder_num_heads=4, kernels="torch")
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    grads, saved = [], []
    for enc, dec in settings:
        torch.manual_seed(0)
        m = build_model(cfg)
        if enc or dec:
            apply_activation_checkpointing(m, first=enc, decoder_first=dec)
        assert (m.checkpoint_first, m.checkpoint_first_decoder, m.grad_checkpointing) == (enc, dec, False)
        loss, nbytes = _saved_bytes(m, imgs, noise)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        saved.append(nbytes)
    for g in grads[1:]:
        assert g.keys() == grads[0].keys()
        for n in g:
            assert torch.equal(g[n], grads[0][n]), n
    # each recomputed block keeps only its input: the saved bytes fall block by block, linearly (blocks alike)
    assert all(a > b for a, b in itertools.pairwise(saved))
    per_block = (saved[0] - saved[2]) / 4
    assert abs((saved[0] - saved[1]) - 2 * per_block) <= 0.05 * per_block * 2


def test_bf16_pure_recomputes_checkpointed_blocks_in_bf16():
    """The recompute in backward uses the bf16 copies the forward used, not the fp32 masters put back after
    functional_call (which crashed with a dtype mismatch): same gradients as bf16-pure without checkpointing."""
    from engine.config import debug
    from engine.mixed import Bf16Compute
    from engine.levers import apply_activation_checkpointing

    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = build_model(debug().model)
        if ckpt:
            apply_activation_checkpointing(m, first=2, decoder_first=1)
        comp = Bf16Compute(m)
        comp.refresh()
        loss, _, _ = comp(imgs, 0.75, noise)
        loss.backward()
        comp.collect(first=True)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert all(p.dtype == torch.float32 for p in m.parameters())
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert grads[1][n].dtype == torch.float32
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_checkpoint_blocks_is_checked():
    import pytest

    from engine.config import Config, ConfigError, apply_overrides, debug

    with pytest.raises(ConfigError, match="train.checkpoint_blocks must be"):
        apply_overrides(debug(), {"train.checkpoint_blocks": "-1"})
    # against the model's depth, by the config itself (overrides, presets and saved configs alike)
    with pytest.raises(ConfigError, match="more than the encoder's 2 blocks"):
        apply_overrides(debug(), {"train.checkpoint_blocks": "3"})
    with pytest.raises(ConfigError, match="more than the encoder's 2 blocks"):
        Config.from_dict(dict(debug().to_dict(), train=dict(debug().to_dict()["train"], checkpoint_blocks=3)))
    ok = apply_overrides(debug(), {"train.checkpoint_blocks": "3", "model.depth": "3"})  # raised together: fine
    assert ok.train.checkpoint_blocks == ok.model.depth == 3
    with pytest.raises(ConfigError, match="train.checkpoint_decoder_blocks must be"):
        apply_overrides(debug(), {"train.checkpoint_decoder_blocks": "-2"})
    with pytest.raises(ConfigError, match="more than the decoder's 1 blocks"):
        apply_overrides(debug(), {"train.checkpoint_decoder_blocks": "2"})
    ok = apply_overrides(debug(), {"train.checkpoint_decoder_blocks": "1"})
    assert ok.train.checkpoint_decoder_blocks == 1


def test_evaluating_restores_the_mode_the_model_was_in_however_the_block_ends():
    from engine.model import evaluating

    m = torch.nn.Sequential(torch.nn.Dropout(0.5))
    for mode in (True, False):
        m.train(mode)
        with evaluating(m) as inner:
            assert inner is m and not m.training
        assert m.training is mode
        with pytest.raises(KeyError):
            with evaluating(m):
                raise KeyError("x")
        assert m.training is mode


def test_the_reference_factories_take_their_dimensions_from_the_presets():
    from engine.config import PRESETS
    from engine.model import mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16

    for make in (mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14):
        want = PRESETS[make.__name__]().model
        m = make(depth=1, decoder_depth=1)
        assert (m.patch_size, m.cls_token.shape[-1]) == (want.patch_size, want.embed_dim)
        assert m.blocks[0].attn.num_heads == want.num_heads and len(m.blocks) == 1  # keywords still override
