"""Masked Autoencoder with a ViT backbone (He et al., 2021), built from timm layers.

The encoder sees only the kept patches plus the cls token; the decoder (512 wide, 8 blocks, 16 heads
in the paper) sees encoder tokens projected to its width, a shared learned mask token at every removed
position, and fixed 2-D sin-cos position embeddings; it predicts p*p*C pixels per patch. Parameter names
follow the paper's reference implementation so its checkpoints load strictly and the encoder exports to
timm's VisionTransformer. This file knows nothing of torch.distributed.
"""

from __future__ import annotations

import contextlib
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

import kernels
from kernels.loss import patchify, unpatchify

from .config import PRESETS, ModelConfig, check_mask_ratio


# ----------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings, as in the reference implementation (float64 maths, fp32 result)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[grid*grid (+1), dim] fp32; the cls position (first row) is zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Position embeddings [1, prefix + h*w, D] of a square h x h grid, bicubically resampled to `grid` (rows,
    columns; a change of resolution, e.g. fine-tuning at 448 an encoder pretrained at 224); the cls token's row is
    kept. The reference implementation's `interpolate_pos_embed` (fp32, align_corners=False, no antialias), equal
    to timm's resample_abs_pos_embed with antialias=False."""
    import torch.nn.functional as F

    n = pos_embed.shape[1] - prefix
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], patches], dim=1)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and a light ViT decoder.

    forward(imgs [N, C, H, W], mask_ratio, noise [N, L] | None) -> (loss, pred [N, L, p*p*C], mask [N, L]).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=True, mask_ratio=0.75, encoder_mask_tokens=False, kernels_impl="auto",
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.encoder_mask_tokens = encoder_mask_tokens
        self.kernels = kernels_impl

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        num_patches = self.patch_embed.num_patches
        self.num_patches = num_patches
        self.grid_size = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim, **dd), requires_grad=False)
        if encoder_mask_tokens:  # only in the dense baseline, so default checkpoints keep the reference keys
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, **dd) for _ in range(depth)
        ])
        self.norm = norm_layer(embed_dim, **dd)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True, **dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim, **dd),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, **dd)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = norm_layer(decoder_embed_dim, **dd)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True, **dd)

        self.grad_checkpointing = False  # set by engine.levers: recompute each block in backward
        self.blocks_draw_random = False  # set by a classifier that gives the blocks drop path (engine/evaluate.py)
        self.checkpoint_first = 0  # or only the first N encoder blocks (train.checkpoint_blocks)
        self.checkpoint_first_decoder = 0  # and the first N decoder blocks (train.checkpoint_decoder_blocks)
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None) -> "MaskedAutoencoderViT":
        return cls(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                   embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                   decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
                   decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio,
                   norm_pix_loss=cfg.norm_pix_loss, mask_ratio=cfg.mask_ratio,
                   encoder_mask_tokens=cfg.encoder_mask_tokens, kernels_impl=cfg.kernels,
                   device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------
    # initialisation (as the reference: sin-cos position embeddings, xavier linears, normal(0.02) tokens)

    def initial_value(self, name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        """The initial value of parameter `name` (full shape), as the reference initialises it: sin-cos
        position embeddings, xavier-uniform linears and patch projection (as a linear), normal(0.02) tokens,
        LayerNorm ones/zeros, zero biases. Each parameter draws from its own generator seeded by (seed, name),
        so the result does not depend on the order of initialisation or on how parameters are sharded.
        """
        import zlib

        if name in ("pos_embed", "decoder_pos_embed"):
            return sincos_2d_pos_embed(shape[-1], self.grid_size).reshape(shape)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        leaf = name.rsplit(".", 1)[-1]
        if name in ("cls_token", "mask_token", "encoder_mask_token"):
            return torch.empty(shape).normal_(0.0, 0.02, generator=g)
        owner = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
        if isinstance(owner, nn.LayerNorm):
            return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        if leaf == "bias":
            return torch.zeros(shape)
        if leaf == "weight" and isinstance(owner, (nn.Linear, nn.Conv2d)):
            fan_out, fan_in = shape[0], int(torch.Size(shape[1:]).numel())
            bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier uniform (the conv as a linear)
            return torch.empty(shape).uniform_(-bound, bound, generator=g)
        raise ValueError(f"no initialisation rule for parameter {name!r}")

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """(Re)initialise every parameter in place; also materialises a model built on the meta device
        (after `to_empty`). Sharded (DTensor) parameters are handled by engine.parallel."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, tuple(p.shape), seed).to(p.dtype))

    # ------------------------------------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> [N, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> imgs [N, C, H, W]."""
        return unpatchify(x, self.patch_size, self.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                       pos: torch.Tensor | None = None):
        """x [N, L, D] (+ pos) -> (x_kept [N, K, D], mask [N, L], ids_restore [N, L], ids_keep [N, K])."""
        return kernels.random_masking(x, mask_ratio, noise, impl=self.kernels, pos=pos)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs [N, C, H, W] -> latent [N, K+1, D] (or [N, L+1, D] in the dense baseline), mask, ids_restore."""
        # images enter in the patch projection's dtype (a no-op under autocast; bf16 under bf16-pure compute)
        x = self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype))  # [N, L, D]
        if noise is None:
            noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
        if self.encoder_mask_tokens:
            # dense baseline: every patch enters the encoder, removed ones replaced by a learned token
            _, mask, ids_restore, _ = self.random_masking(x, mask_ratio, noise)
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.encoder_mask_token.to(x.dtype) * w
            x = x + self.pos_embed[:, 1:, :]
        else:
            # x + pos_embed, then keep K rows: one pass that reads only the kept rows' embeddings
            x, mask, ids_restore, _ = self.random_masking(x, mask_ratio, noise, pos=self.pos_embed[:, 1:, :])
        x = self._run_blocks(self.blocks, self._prepend_cls(x))
        x = self.norm(x)
        return x, mask, ids_restore

    def _prepend_cls(self, x: torch.Tensor, owner: nn.Module | None = None) -> torch.Tensor:
        """[N, T, D] -> [N, T+1, D] with the cls token (plus its position embedding) first (`owner`'s: see
        forward_features)."""
        o = self if owner is None else owner
        cls = (o.cls_token + o.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        first = self.checkpoint_first if blocks is self.blocks else self.checkpoint_first_decoder
        for i, blk in enumerate(blocks):
            if (self.grad_checkpointing or i < first) and torch.is_grad_enabled():
                # pretraining's blocks draw no random numbers (no dropout, no drop path), so the RNG state is not
                # stashed (that would read the CUDA generator, which a graph capture forbids); blocks with drop path
                # (fine-tuning) stash it, so that the recomputation drops the same paths as the forward did
                x = torch.utils.checkpoint.checkpoint(_RunWith(blk), x, use_reentrant=False,
                                                      preserve_rng_state=self.blocks_draw_random)
            else:
                x = blk(x)
        return x

    def forward_features(self, imgs: torch.Tensor, norm: bool = True, owner: nn.Module | None = None) -> torch.Tensor:
        """The encoder on every patch, no masking (evaluation): imgs [N, C, H, W] -> tokens [N, L+1, D],
        cls first; `norm=False` returns them before the final LayerNorm (for global-pool heads). `owner`: the module
        whose cls_token and pos_embed to read instead of this model's: a classifier that registers them as its own
        parameters and is the module FSDP2 shards (its unsharded tensors are set on it, not on this model)."""
        o = self if owner is None else owner
        x = self.patch_embed(imgs) + o.pos_embed[:, 1:, :]
        x = self._run_blocks(self.blocks, self._prepend_cls(x, owner))
        return self.norm(x) if norm else x

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x [N, K+1, D] (or [N, L+1, D]) -> pred [N, L, p*p*C]."""
        x = self.decoder_embed(x)  # [N, K+1, Dd]
        if not self.encoder_mask_tokens:  # scatter back with mask tokens, + the position embedding, in one pass
            x = kernels.unshuffle(x, ids_restore, self.mask_token, has_cls=True, impl=self.kernels,
                                  pos=self.decoder_pos_embed)  # [N, L+1, Dd]
        else:
            x = x + self.decoder_pos_embed.to(x.dtype)
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        # drop the cls row before the pixel head: pred is the head's own output, not a view of it (FSDP2 warns
        # that an in-place op on a view returned by a sharded module would skip its pre-backward hook), and the
        # head does not compute a row that is thrown away
        return self.decoder_pred(x[:, 1:, :])

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     mask_count: int | None = None) -> torch.Tensor:
        """MSE on removed patches against (normalised) pixels; scalar fp32. mask_count: mask.sum() when known."""
        return kernels.norm_pix_mse(imgs, pred, mask, self.patch_size, norm_pix=self.norm_pix_loss,
                                    impl=self.kernels, mask_count=mask_count)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(mask_ratio, self.num_patches)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        removed = mask.shape[0] * (self.num_patches - kernels.len_keep_for(self.num_patches, mask_ratio))
        loss = self.forward_loss(imgs, pred, mask, mask_count=removed)  # every row removes the same number
        return loss, pred, mask


class _RunWith:
    """A block to recompute with the parameter tensors its forward used. Under bf16-pure (engine.mixed) the
    forward runs inside functional_call on bf16 copies (plain tensors in place of the Parameters), but
    backward's recompute happens after that call has put the fp32 masters back: it would recompute in fp32
    (wrong dtypes, and not the forward's weights). Blocks holding their own Parameters (plain, or FSDP2's,
    which it swaps itself around forward and recompute) are recomputed as they are."""

    def __init__(self, blk: nn.Module):
        self.blk = blk
        params = dict(blk.named_parameters())
        self.params = params if any(not isinstance(p, nn.Parameter) for p in params.values()) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.params is None:
            return self.blk(x)
        return torch.func.functional_call(self.blk, self.params, (x,), tie_weights=False, strict=True)


def build_model(cfg: ModelConfig, device=None, dtype=None) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT.from_config(cfg, device=device, dtype=dtype)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode inside the block, back in the mode it was in after it (however the block ends)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _paper_factory(preset: str):
    """A factory named as in the reference implementation, its encoder's dimensions read from the preset of that
    name (written once, in engine/config.py); keyword arguments as MaskedAutoencoderViT's."""

    def make(**kw) -> MaskedAutoencoderViT:
        m = PRESETS[preset]().model
        return MaskedAutoencoderViT(**{"patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth,
                                       "num_heads": m.num_heads, **kw})

    make.__name__ = make.__qualname__ = preset
    return make


mae_vit_base_patch16 = _paper_factory("mae_vit_base_patch16")
mae_vit_large_patch16 = _paper_factory("mae_vit_large_patch16")
mae_vit_huge_patch14 = _paper_factory("mae_vit_huge_patch14")
