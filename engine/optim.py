"""AdamW with the paper's parameter groups and a per-step warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("cls_token", "mask_token", "encoder_mask_token", "pos_embed", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the rest (1-D params: norms and biases; tokens; position embeddings).

    Frozen parameters (the fixed sin-cos position embeddings) are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if p.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def apex_fused_adam():
    """apex.optimizers.FusedAdam when apex is importable, else None."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore
    except Exception:
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, optim_cfg, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """torch fused AdamW by default (CUDA and CPU); apex FusedAdam when asked for (or auto on CUDA with apex)."""
    groups = param_groups(model, optim_cfg.weight_decay)
    want_apex = optim_cfg.fused == "apex" or (optim_cfg.fused == "auto" and device.type == "cuda"
                                               and apex_fused_adam() is not None)
    if want_apex:
        FusedAdam = apex_fused_adam()
        if FusedAdam is None:
            raise RuntimeError("optim.fused=apex but apex is not importable; use --optim.fused torch")
        if device.type != "cuda":
            raise RuntimeError("optim.fused=apex needs CUDA")
        return FusedAdam(groups, lr=lr, betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay, adam_w_mode=True)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused unsupported for this device/dtype: plain foreach AdamW
        return torch.optim.AdamW(groups, lr=lr, betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay)


def supports_found_inf(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt.step()` skips itself on device when `opt.found_inf` is 1 (torch fused Adam/AdamW)."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False))


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over warmup_steps, then half-cycle cosine to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (times its lr_scale); a tensor lr (a captured step reads it) is filled in place."""
    for g in opt.param_groups:
        v = lr * g.get("lr_scale", 1.0)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(v)
        else:
            g["lr"] = v
