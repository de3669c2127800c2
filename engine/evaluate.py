"""Downstream evaluation of a pretrained encoder, as in the paper: linear probing, (partial) fine-tuning,
and a kNN monitor.

- Linear probe: frozen encoder, BatchNorm without affine (eps 1e-6) before a linear head, cls token or
  global average pooling, LARS (no weight decay or trust ratio on 1-D parameters), crop/flip only.
- Fine-tuning: layer-wise lr decay, drop path, label smoothing, mixup/cutmix (timm), global-pool head
  with fc_norm, AdamW with warm-up + cosine.
- Partial fine-tuning (the paper's Figure 9): only the last k blocks (plus the head) train; k = 0 is the
  linear probe.
- kNN: k = 20 nearest training features by cosine similarity, votes weighted by exp(sim / 0.07).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import autocast
from .model import MaskedAutoencoderViT


class EncoderClassifier(nn.Module):
    """The MAE encoder (no masking) with a classification head.

    pool="cls": the cls token after the encoder's final norm; pool="gap": the mean of the patch tokens,
    then fc_norm (a fresh LayerNorm), the encoder's final norm unused, as in the paper's fine-tuning.
    head="bn_linear": BatchNorm1d(affine=False, eps=1e-6) + Linear (the linear probe); "linear": Linear.
    """

    def __init__(self, mae: MaskedAutoencoderViT, num_classes: int, pool: str = "cls", head: str = "bn_linear",
                 drop_path: float = 0.0, owns_tokens: bool = False):
        super().__init__()
        if pool not in ("cls", "gap"):
            raise ValueError(f"pool must be cls or gap, got {pool!r}")
        self.patch_embed, self.cls_token, self.pos_embed = mae.patch_embed, mae.cls_token, mae.pos_embed
        self.blocks, self.norm = mae.blocks, mae.norm
        self._mae = (mae,)  # not a submodule: its decoder stays out of this model
        # owns_tokens: this model is the one trained and sharded (mae finetune / linprobe): the forward reads the
        # cls token and position embeddings registered here (FSDP2 sets their unsharded tensors on this module);
        # otherwise (the kNN monitor on a sharded MAE) the MAE's own
        self.owns_tokens = owns_tokens
        self.pool = pool
        dim = mae.cls_token.shape[-1]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "gap" else nn.Identity()
        lin = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(lin.weight, std=0.01 if head == "bn_linear" else 2e-5)
        nn.init.zeros_(lin.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), lin) if head == "bn_linear" else lin
        if drop_path > 0:  # stochastic depth, linearly increasing over depth
            from timm.layers import DropPath

            n = len(self.blocks)
            for i, blk in enumerate(self.blocks):
                rate = drop_path * i / max(1, n - 1)
                blk.drop_path1, blk.drop_path2 = DropPath(rate), DropPath(rate)
            mae.blocks_draw_random = True  # activation checkpointing recomputes with the same drop-path draws

    def group_matcher(self, coarse: bool = False) -> dict:
        """The grouping of parameters by depth for timm's layer-wise lr decay, as the paper groups them: the stem
        (layer 0), each block, then the final norm, fc_norm and the head together on top. (timm's own ViT puts the
        final norm with the last block, which the paper's recipe does not.)"""
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None)],
                    head=r"^norm|^fc_norm|^head")

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D] (through the MAE's forward_features, so FSDP gathers it)."""
        x = self._mae[0].forward_features(imgs, norm=self.pool == "cls", owner=self if self.owns_tokens else None)
        if self.pool == "gap":
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return x[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs))

    def freeze_all_but_last(self, k: int) -> None:
        """Train only the last k blocks (with the final norm when k > 0) and the head; k = 0: a linear probe."""
        for p in self.parameters():
            p.requires_grad = False
        for blk in list(self.blocks)[len(self.blocks) - k:] if k > 0 else []:
            for p in blk.parameters():
                p.requires_grad = True
        if k > 0:
            for p in list(self.norm.parameters()) + list(self.fc_norm.parameters()):
                p.requires_grad = True
        for p in self.head.parameters():
            p.requires_grad = True
        self.pos_embed.requires_grad = False


def lars(params, lr: float) -> torch.optim.Optimizer:
    """The paper's linear-probe optimizer: LARS, momentum 0.9, trust coefficient 0.001, no weight decay, 1-D
    parameters (biases, norms) updated as plain momentum SGD. timm's Lars with these groups and eps 0 is the paper's
    LARS exactly (tests/test_evaluate.py holds it to a transcription, bit for bit)."""
    from timm.optim import Lars

    params = list(params)
    mats, vecs = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    groups = [g for g in ({"params": mats, "always_adapt": True}, {"params": vecs, "always_adapt": False})
              if g["params"]]
    return Lars(groups, lr=lr, momentum=0.9, weight_decay=0.0, trust_coeff=0.001, eps=0.0)


def layer_decay_groups(model: EncoderClassifier, weight_decay: float, layer_decay: float,
                       no_decay_names=("cls_token", "pos_embed")) -> list[dict]:
    """Param groups with lr_scale = layer_decay ** (depth + 1 - layer_id): patch embedding and tokens are layer 0,
    block i is layer i + 1, the norms and head the top layer; no weight decay on 1-D parameters and the tokens.
    timm's param_groups_layer_decay (through EncoderClassifier.group_matcher), the paper's grouping exactly."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay_names,
                                    layer_decay=layer_decay)


def lr_at_epoch(epoch: float, epochs: int, warmup: float, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up, then half-cycle cosine, per iteration (epoch is fractional). Written out rather than timm's
    CosineLRScheduler: a pure function of the position needs no scheduler state (tests hold the two equal)."""
    if epoch < warmup:
        return lr * epoch / warmup
    t = (epoch - warmup) / max(1e-8, epochs - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class EvalResult:
    protocol: str
    top1: float
    epochs: int
    train_samples: int
    val_samples: int
    history: list


def _autocast(device):
    """Evaluation's autocast: bf16 on CUDA, none on the CPU."""
    return autocast(device, torch.bfloat16 if torch.device(device).type == "cuda" else None)


@torch.no_grad()
def accuracy(model: nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    for imgs, labels in loader.epoch(0):
        with _autocast(device):
            logits = model(imgs)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    return correct / max(1, total)


def train_classifier(model: EncoderClassifier, train_loader, val_loader, device, *, epochs: int, optimizer,
                     base_lr: float, warmup: float, criterion, mixup=None, log=print, protocol: str = "") -> EvalResult:
    history = []
    steps = train_loader.plan.batches_per_epoch
    for epoch in range(epochs):
        model.train()
        _set_frozen_eval(model)
        tot, n = 0.0, 0
        for i, (imgs, labels) in enumerate(train_loader.epoch(epoch)):
            lr = lr_at_epoch(epoch + i / steps, epochs, warmup, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            target = labels
            if mixup is not None:
                imgs, target = mixup(imgs, labels)
            with _autocast(device):
                loss = criterion(model(imgs).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tot += float(loss.detach())
            n += 1
        acc = accuracy(model, val_loader, device)
        history.append({"epoch": epoch + 1, "train_loss": tot / max(1, n), "val_top1": acc})
        log(f"{protocol} epoch {epoch + 1}/{epochs}: train loss {tot / max(1, n):.4f}, val top-1 {acc * 100:.2f}%")
    return EvalResult(protocol, history[-1]["val_top1"] if history else 0.0, epochs, len(train_loader.files),
                      len(val_loader.files), history)


def _set_frozen_eval(model: nn.Module) -> None:
    """Frozen blocks stay in eval mode (no drop path, and BatchNorm-free anyway); trainable ones train."""
    for blk in model.blocks:
        if not any(p.requires_grad for p in blk.parameters()):
            blk.eval()


def fit_warmup(warmup: float, epochs: int, steps_per_epoch: int, protocol: str, log) -> float:
    """The warm-up a run of `epochs` can have (at most half of it, with a warning naming both), and a note when
    the whole run is too few optimizer steps for the paper's recipe to get anywhere (small labelled sets)."""
    if warmup > epochs / 2:
        log(f"warning: {protocol}: a warm-up of {warmup:g} epochs does not fit a {epochs}-epoch run; using "
            f"{epochs / 2:g} (half of it)")
        warmup = epochs / 2
    total = epochs * steps_per_epoch
    if total < 200:
        log(f"note: {protocol}: {total} optimizer steps in all ({steps_per_epoch} per epoch); the paper's recipe "
            "expects thousands. On a small labelled set raise --epochs (and --lr for the probe: the digits "
            "demonstration uses --epochs 20 --lr 40 --pool gap)")
    return warmup


def linear_probe(mae: MaskedAutoencoderViT, train_loader, val_loader, device, *, epochs: int = 90,
                 base_lr: float = 0.1, batch_size: int = 256, warmup: float = 10, pool: str = "cls",
                 log=print) -> EvalResult:
    """The paper's linear probe: frozen encoder, BN (no affine) + linear head, LARS, lr = base_lr * batch / 256."""
    model = EncoderClassifier(mae, train_loader.num_classes, pool=pool, head="bn_linear").to(device)
    model.freeze_all_but_last(0)
    lr = base_lr * batch_size / 256
    opt = lars([p for p in model.parameters() if p.requires_grad], lr=lr)
    warmup = fit_warmup(warmup, epochs, train_loader.plan.batches_per_epoch, "linprobe", log)
    return train_classifier(model, train_loader, val_loader, device, epochs=epochs, optimizer=opt, base_lr=lr,
                            warmup=warmup, criterion=nn.CrossEntropyLoss(), log=log, protocol="linprobe")


def finetune(mae: MaskedAutoencoderViT, train_loader, val_loader, device, *, epochs: int = 100,
             base_lr: float = 5e-4, batch_size: int = 256, warmup: float = 5, layer_decay: float = 0.75,
             weight_decay: float = 0.05, drop_path: float = 0.1, smoothing: float = 0.1, mixup: float = 0.8,
             cutmix: float = 1.0, last_blocks: int | None = None, pool: str = "gap", log=print) -> EvalResult:
    """The paper's fine-tuning recipe; last_blocks=k trains only the last k blocks (partial fine-tuning)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    model = EncoderClassifier(mae, train_loader.num_classes, pool=pool, head="linear", drop_path=drop_path).to(device)
    k = len(model.blocks) if last_blocks is None else last_blocks
    if not 0 <= k <= len(model.blocks):
        raise ValueError(f"last_blocks must be in [0, {len(model.blocks)}], got {k}")
    model.freeze_all_but_last(k)
    if k == len(model.blocks):  # full fine-tuning: embeddings train too (position embeddings stay fixed)
        for p in list(model.patch_embed.parameters()) + [model.cls_token]:
            p.requires_grad = True
    lr = base_lr * batch_size / 256
    opt = torch.optim.AdamW(layer_decay_groups(model, weight_decay, layer_decay), lr=lr, betas=(0.9, 0.999))
    mix = None
    if mixup > 0 or cutmix > 0:
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                    num_classes=train_loader.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
    return train_classifier(model, train_loader, val_loader, device, epochs=epochs, optimizer=opt, base_lr=lr,
                            warmup=fit_warmup(warmup, epochs, train_loader.plan.batches_per_epoch, "finetune", log),
                            criterion=criterion, mixup=mix, log=log,
                            protocol=f"finetune(last {k} blocks)")


@torch.no_grad()
def extract(model: EncoderClassifier, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, labels = [], []
    for imgs, y in loader.epoch(0):
        with _autocast(device):
            feats.append(model.features(imgs).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted classes of test features by temperature-weighted cosine kNN over training features."""
    train_f = F.normalize(train_f.float(), dim=1)
    test_f = F.normalize(test_f.float(), dim=1)
    k = min(k, train_f.shape[0])
    preds = []
    for i in range(0, test_f.shape[0], chunk):
        sim = (test_f[i:i + chunk] @ train_f.T).float()  # [b, n_train]; fp32 also under an autocast (kNN monitor)
        top, idx = sim.topk(k, dim=1)
        w = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], w)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_eval(mae: MaskedAutoencoderViT, train_loader, val_loader, device, k: int = 20, temperature: float = 0.07,
             pool: str = "gap") -> EvalResult:
    """kNN top-1. Default features: the mean of the patch tokens, layer-normalised; MAE pretraining gives the
    cls token no objective of its own, and on small models its kNN accuracy lags far behind."""
    device = torch.device(device)
    model = EncoderClassifier(mae, train_loader.num_classes, pool=pool, head="linear").to(device)
    tf, ty = extract(model, train_loader, device)
    vf, vy = extract(model, val_loader, device)
    acc = float((knn_classify(tf, ty, vf, train_loader.num_classes, k, temperature) == vy).float().mean())
    return EvalResult(f"knn(k={k})", acc, 0, len(ty), len(vy), [])
