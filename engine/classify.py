"""Fine-tuning and linear probing as runs of the engine (`mae finetune`, `mae linprobe`): the paper's recipes
(engine.config.CLASSIFY_PRESETS) on a labelled image folder, with what a pretraining run has: a run directory with
config.toml, metrics.jsonl (loss, lr, img/s per log line; top-1 / top-5 per validation) and TensorBoard, atomic
checkpoints (keep-last-K) and `best.pt` (the best validation top-1), `--resume` that continues bit for bit, stop
signals, the divergence guard, the progress bar, FSDP2 under torchrun.

The step is the engine's one step (engine.step.TrainStep: gradient accumulation, autocast, the gradient norm, bad
steps skipped, fp16 loss scaling) with the classifier's forward and loss in place of the MAE's; the loop is built from
the parts of engine/loop.py. What differs from pretraining is only what a classifier needs:

- the model: the pretrained encoder (engine.evaluate.EncoderClassifier), its position embeddings resampled when the
  resolution changes (engine.checkpoint.fit_pos_embeds), frozen but for the head (linprobe) or the last k blocks;
- the optimizer: AdamW with layer-wise lr decay, or LARS (the probe);
- the batch: mixup / cutmix on the device (timm), drop path: every random draw of a micro-batch comes from a seed
  that is a function of (train.seed, micro-batch, rank), so a resumed run draws the same ones;
- validation: every sample exactly once over the ranks (pipelines.labelled.shard_for_eval), correct counts summed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import ClassifyConfig, ConfigError, to_toml
from .device import autocast, resolve_dtype
from .evaluate import EncoderClassifier, layer_decay_groups, lars
from .health import Health, StopVote
from .loop import Checkpointer, Guard, Job, Loop, StepMeter, StopSignals, Validation, resume_parts
from .metrics import MetricsWriter, datasheet_peak, vit_train_flops_per_image
from .model import build_model, evaluating
from .optim import lr_at, set_lr
from .levers import apply_activation_checkpointing, apply_regional_compile
from .parallel import DistContext, all_reduce_
from .run import Run
from .step import TrainStep, loss_scaler


@dataclass
class ClassifyResult:
    step: int
    top1: float | None
    """Validation top-1 at the last validation (a fraction)."""
    top5: float | None
    best_top1: float | None
    best_epoch: int | None
    checkpoint: Path | None
    run_dir: Path
    interrupted: str | None = None
    history: list | None = None


def micro_batch_seed(seed: int, micro_batch: int, rank: int) -> int:
    """The seed of a micro-batch's random draws (mixup / cutmix, drop path): its position, not the run's history."""
    return (seed * 1_000_003 + micro_batch * 7919 + rank * 104_729 + 12345) % (2**63 - 1)


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ClassifyRun(Run):
    """Set-up in the constructor (run directory, resume checks, loaders, model, optimizer, step); `fit()` runs."""

    @property
    def command(self) -> str:
        return f"mae {self.cfg.task.protocol}"

    # ------------------------------------------------------------------------------------------------------
    # set-up

    def _setup(self, resume: bool) -> None:
        cfg, t, task = self.cfg, self.cfg.train, self.cfg.task
        if not task.train or not task.val:
            raise ConfigError(f"{self.command} needs labelled images: --train DIR and --val DIR (task.train, task.val: "
                              "one subfolder per class, or shards of `mae data pack --labels`; `mae data digits OUT` "
                              "writes a small set)")
        if cfg.data.backend in ("dali", "synthetic"):
            raise ConfigError(f"data.backend={cfg.data.backend}: {self.command} reads labelled folders through the "
                              "torchvision pipeline (the recipe's RandAugment and random erasing are timm's, with no "
                              "DALI equivalent here); use --data.backend torchvision (or auto)")
        if self.is_main:
            gone = ckpt.remove_stale_temp_files(self.run_dir)
            if gone:
                self.log(f"removed {len(gone)} temporary file(s) of interrupted saves in {self.run_dir}")
        resume_path = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if resume and resume_path is None and self.is_main:
            self.log(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
        saved_meta = None
        if resume_path is not None:  # refusals before anything is built or written
            saved_meta = ckpt.read_meta(resume_path)
            if resume_path.is_dir():
                ckpt.read_dcp_metadata(resume_path)
            ckpt.check_training_meta(saved_meta, resume_path)
            self._check_same_task(saved_meta, resume_path)

        img = cfg.model.img_size if not task.height or task.height == cfg.model.img_size else (
            task.height, cfg.model.img_size)
        finetune = task.protocol == "finetune"
        self.train_loader = _labelled(task.train, img, t.batch_size, cfg, self.device, train=True, rank=self.rank,
                                      world=self.world, auto_augment=task.auto_augment if finetune else "",
                                      reprob=task.reprob)
        self.val_loader = _labelled(task.val, img, t.batch_size, cfg, self.device, train=False, rank=self.rank,
                                    world=self.world)
        if self.val_loader.classes != self.train_loader.classes:
            raise ConfigError(f"task.val {task.val} has the classes {_few(self.val_loader.classes)}, task.train "
                              f"{task.train} {_few(self.train_loader.classes)}: they must be the same folders")
        self.num_classes = self.train_loader.num_classes
        self.steps_per_epoch = self.train_loader.batches_per_epoch // t.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"one epoch of {task.train} has {self.train_loader.batches_per_epoch} micro-batch(es) "
                              f"per rank, fewer than train.accum_steps={t.accum_steps}; lower accum_steps or batch_size")
        self.total_steps = t.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.warmup_steps = round(min(cfg.optim.warmup_epochs, t.epochs / 2) * self.steps_per_epoch)
        if cfg.optim.warmup_epochs > t.epochs / 2 and self.is_main:
            self.log(f"warning: a warm-up of {cfg.optim.warmup_epochs:g} epochs does not fit a {t.epochs}-epoch run; "
                     f"using {t.epochs / 2:g} (half of it)")

        self.model, self.weights = build_classifier(cfg, self.num_classes, self.ctx, self.device,
                                                    load_pretrained=saved_meta is None)
        self.global_batch = t.batch_size * t.accum_steps * self.world
        self.lr = cfg.optim.scaled_lr(self.global_batch)
        self.optimizer = build_classifier_optimizer(cfg, self.model, self.lr, self.device)
        self.mixup, self.criterion = build_loss(cfg, self.num_classes)
        self.training = TrainStep(self.model, self.optimizer, device=self.device, amp_dtype=self.amp_dtype,
                                  forward=self._forward, accum_steps=t.accum_steps,
                                  scaler=loss_scaler(t.precision, self.device))
        self.micro_batch = 0
        self.parts: dict = {}  # the loop's parts with resume state (fit builds them; meta gathers their state)
        self._parts_state: dict = {}  # what a resumed checkpoint saved of them
        self.flops_per_image = vit_train_flops_per_image(cfg.model, self.num_classes)
        self.peak = datasheet_peak(self.device) if self.device.type == "cuda" else None
        if resume_path is not None:
            self._resume(resume_path)
            self._resumed_from = resume_path
        if self.is_main:  # the resolved configuration, written once every check passed
            ckpt.atomic_write(self.run_dir / "config.toml", lambda f: f.write(to_toml(cfg).encode()))

    def _check_same_task(self, meta: dict, path: Path) -> None:
        saved = meta.get("config") or {}
        task = saved.get("task") if isinstance(saved, dict) else None
        if not isinstance(task, dict):
            raise ckpt.CheckpointError(f"{path} is not a checkpoint of `mae finetune` or `mae linprobe` (no task in "
                                       "its config); use another run directory")
        if task.get("protocol") != self.cfg.task.protocol:
            raise ckpt.CheckpointError(f"{path} is a {task.get('protocol')} checkpoint; this is {self.command}: use "
                                       "another run directory")
        ckpt.check_architecture(saved, self.cfg.model, path)

    def loaders(self) -> list:
        return [getattr(self, "train_loader", None), getattr(self, "val_loader", None)]

    # ------------------------------------------------------------------------------------------------------
    # the step

    def _forward(self, imgs: torch.Tensor, _mask_ratio, target: torch.Tensor):
        """The classifier's loss in TrainStep's call shape (loss, _, _): logits and loss in fp32."""
        return self.criterion(self.model(imgs).float(), target), None, None

    def _next_micro_batch(self, stream):
        imgs, labels = next(stream)
        self.micro_batch += 1
        seed_all(micro_batch_seed(self.cfg.train.seed, self.micro_batch, self.rank))  # mixup, cutmix, drop path
        if self.mixup is not None:
            if imgs.shape[0] % 2:
                raise ConfigError(f"mixup / cutmix pair the images of a batch: train.batch_size={imgs.shape[0]} "
                                  "must be even (or set --task.mixup 0 --task.cutmix 0)")
            return self.mixup(imgs, labels)
        return imgs, labels

    def training_mode(self) -> None:
        """Train mode, with the frozen blocks in eval mode (no drop path): at the loop's start and after each
        validation (which leaves every module in train mode), not at every step."""
        self.model.train()
        _frozen_blocks_eval(self.model)

    def optimizer_step(self, stream) -> tuple[torch.Tensor, torch.Tensor]:
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.warmup_steps, self.lr, self.cfg.optim.min_lr))
        loss, finite = self.training((self._next_micro_batch(stream) for _ in range(self.cfg.train.accum_steps)))
        self.step += 1
        return loss, finite

    # ------------------------------------------------------------------------------------------------------
    # validation

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """(top-1, top-5) over the whole validation set: each rank its share, the counts summed over ranks."""
        counts = torch.zeros(3, device=self.device, dtype=torch.float64)  # top-1 hits, top-5 hits, samples
        with evaluating(self.model), autocast(self.device, self.amp_dtype):
            for imgs, labels in self.val_loader.val_batches():
                logits = self.model(imgs).float()
                valid = labels >= 0
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                hit = top == labels[:, None]
                counts[0] += (hit[:, 0] & valid).sum()
                counts[1] += (hit.any(dim=-1) & valid).sum()
                counts[2] += valid.sum()
        all_reduce_(counts)
        n = max(1.0, float(counts[2]))
        return float(counts[0]) / n, float(counts[1]) / n

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def meta(self) -> dict:
        return {
            **self.position_meta(self.train_loader.batches_per_epoch),
            "rng": ckpt.capture_rng(),  # (every draw is seeded by position; kept for the format)
            "weights": self.weights.get("format"),
            **({"loss_scale": self.training.scaler.state_dict()} if self.training.scaler else {}),
        }

    def save(self) -> Path:
        return ckpt.save_training_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.meta(),
                                             self.cfg.train.keep_last, sharded=self.ctx.distributed,
                                             is_main=self.is_main)

    def save_best(self) -> Path:
        """best.pt: the classifier's full state dict (gathered under FSDP2: every rank calls this), the config and
        the validation that made it the best."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = self.run_dir / "best.pt"
        if self.is_main:
            ckpt.atomic_torch_save({"model": sd, "config": self.cfg.to_dict(), "best": self.parts["validation"].best,
                                    "classes": list(self.train_loader.classes)}, path)
        return path

    def _resume(self, path: Path) -> None:
        meta = ckpt.load_training_checkpoint(path, self.model, self.optimizer)
        self.step = int(meta["step"])
        per_micro = self.cfg.train.batch_size * self.world
        seen = int(meta["data"].get("samples_seen", meta["data"]["micro_batch"] * per_micro))
        if seen % per_micro:
            raise ckpt.CheckpointError(f"{path}: {seen} samples seen is not a whole number of global micro-batches of "
                                       f"{per_micro}; resume with the batch size and world size it was saved with")
        self.micro_batch = seen // per_micro
        self._parts_state = meta.get("parts") if isinstance(meta.get("parts"), dict) else {}
        if self.training.scaler is not None and isinstance(meta.get("loss_scale"), dict):
            self.training.scaler.load_state_dict(meta["loss_scale"])
        if self.is_main:
            self.log(f"resumed from {path} at step {self.step} (epoch {self.step / self.steps_per_epoch:g})")

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def banner(self) -> str:
        t, m, task = self.cfg.train, self.cfg.model, self.cfg.task
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        what = ("linear probe (frozen encoder, BatchNorm + linear head, LARS)" if task.protocol == "linprobe" else
                f"fine-tuning ({'every block' if task.last_blocks < 0 else f'the last {task.last_blocks} blocks'}, "
                f"layer decay {task.layer_decay:g}, drop path {task.drop_path:g})")
        resized = "; position embeddings " + ", ".join(self.weights["resized"]) if self.weights.get("resized") else ""
        size = f"{task.height}x{m.img_size}" if task.height else f"{m.img_size}"
        aug = (f"{task.auto_augment}, random erasing {task.reprob:g}" if task.auto_augment and task.protocol == "finetune"
               else "crop + flip")
        return (f"{self.command}, preset {self.cfg.preset}: {what}\n"
                f"encoder {task.checkpoint or 'random init'} ({self.weights.get('format')}){resized}; "
                f"{size}px, patch {m.patch_size}; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train\n"
                f"data {task.train} ({len(self.train_loader.files)} images, {self.num_classes} classes; torchvision "
                f"loader, {self.train_loader.num_workers} workers), val "
                f"{task.val} ({len(self.val_loader.files)}); augmentation {aug}"
                + (f", mixup {task.mixup:g} / cutmix {task.cutmix:g}" if self.mixup is not None else "")
                + f", label smoothing {task.smoothing:g}\n"
                f"device {self.device}, precision {self.amp_dtype or torch.float32}"
                + (" with dynamic loss scaling" if self.training.scaler else "")
                + (f", FSDP2 over {self.world} ranks" if self.ctx.distributed else "")
                + f"; global batch {self.global_batch} = {t.batch_size} x {t.accum_steps} accumulation x {self.world} "
                f"rank(s); lr {self.lr:.3g} " + ("(absolute)" if self.cfg.optim.lr > 0 else
                                                f"= base {self.cfg.optim.base_lr:g} x {self.global_batch}/256")
                + f"\n{self.total_steps} steps ({t.epochs} epochs x {self.steps_per_epoch}), warm-up {self.warmup_steps}, "
                f"stopping at step {self.stop_at}; run dir {self.run_dir}")

    def fit(self) -> ClassifyResult:
        """The engine's loop (engine/loop.py's Loop, as pretraining's) with a validation part: a training step, then
        the health check, the log line, the validation (each task.eval_every epochs and at the end; best.pt when
        top-1 improves; a checkpoint with it), the save, a stop signal, each at its own time."""
        t = self.cfg.train
        if self.is_main:
            self.log(self.banner())
        writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard, enabled=self.is_main, resume_step=self.step)
        bar = self.progress_bar(self.stop_at)
        say = bar.write if bar is not None else self.log
        stream = self.train_loader.stream(self.micro_batch)
        health = self.start_health(self.training.param_norm)
        meter = StepMeter(self.device, self.world, self.global_batch, t.log_every, self.stop_at)
        guard = Guard(health, self.training.param_norm, max_bad_steps=t.max_bad_steps, on_divergence="stop",
                      max_rollbacks=0, rollback=None, diverged=self._divergence_message)
        saver = Checkpointer(self.save, t.ckpt_every, self.stop_at, health, self.is_main)
        val = Validation(self.cfg.task.eval_every, self.steps_per_epoch, self.stop_at)
        self.parts = resume_parts({"guard": guard, "validation": val}, self._parts_state)  # meta() gathers them
        last: list[dict] = []
        jobs = [Job(val.due, lambda: last.append(self._validation_line(val, writer, say)), "before_save", saves=True)]
        loop = Loop(meter=meter, guard=guard, saver=saver, vote=StopVote(self.device, self.ctx.distributed),
                    signals=StopSignals(self.is_main), jobs=jobs, say=say, bar=bar,
                    log_line=lambda: self._log_line(meter, writer, bar, say))
        self.training_mode()
        try:
            stop_signal = loop.run(lambda: self._train_step(stream), lambda: self.step, self.stop_at)
            if stop_signal and self.is_main:
                say(f"received {stop_signal}: saved {saver.last} at step {self.step}; continue with --resume")
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            stream.close()
            self.close()
        top1, top5 = (last[-1]["val_top1"], last[-1]["val_top5"]) if last else (None, None)
        best = val.best
        result = ClassifyResult(self.step, top1, top5, best["top1"] if best else None, best["epoch"] if best else None,
                                saver.last, self.run_dir, stop_signal, val.history)
        if self.is_main and not stop_signal:
            self._write_result(result)
        return result

    def _train_step(self, stream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, finite = self.optimizer_step(stream)
        return loss, self.training.grad_norm, finite

    def _validation_line(self, val: Validation, writer, say) -> dict:
        top1, top5 = self.validate()
        self.training_mode()
        better = val.record(self.step, top1, top5)
        if better:
            self.save_best()
        rec, best = val.history[-1], val.best
        writer.log(self.step, epoch=rec["epoch"], val_top1=round(top1, 6), val_top5=round(top5, 6),
                   best_top1=round(best["top1"], 6))
        if self.is_main:
            say(f"epoch {rec['epoch']:g}: val top-1 {top1 * 100:.2f}%, top-5 {top5 * 100:.2f}% "
                f"(best {best['top1'] * 100:.2f}% at epoch {best['epoch']:g}" + (", saved best.pt)" if better else ")"))
        return rec

    def _log_line(self, meter: StepMeter, writer, bar, say) -> None:
        lr = float(self.optimizer.param_groups[-1]["lr"])  # the head's group: the full lr (lr_scale 1)
        rec = meter.record(self.step, self.steps_per_epoch, lr, self.flops_per_image, self.peak)
        if self.training.scaler is not None:
            rec.update(loss_scale=float(self.training.scaler.scale), overflows=int(self.training.scaler.overflows))
        writer.log(self.step, **rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{meter.last_ips:.0f}")
        elif self.is_main:
            say(f"step {self.step}/{self.stop_at} loss {rec['loss']:.4f} lr {lr:.3e} {meter.last_ips:.1f} img/s")
        if rec["skipped"] and self.is_main:
            say(f"warning: skipped {rec['skipped']} step(s) with a non-finite loss or gradient before step "
                f"{self.step}" + (" (fp16 overflow: the loss scale was halved)" if self.training.scaler else ""))
        meter.reset()

    def _write_result(self, r: ClassifyResult) -> None:
        out = {"protocol": self.cfg.task.protocol, "preset": self.cfg.preset, "top1": r.top1, "top5": r.top5,
               "best_top1": r.best_top1, "best_epoch": r.best_epoch, "step": r.step,
               "checkpoint": self.cfg.task.checkpoint or "random init", "weights": self.weights.get("format"),
               "train": self.cfg.task.train, "val": self.cfg.task.val, "train_samples": len(self.train_loader.files),
               "val_samples": len(self.val_loader.files), "epochs": self.cfg.train.epochs, "history": r.history,
               "device": str(self.device), "world": self.world, "torch": torch.__version__}
        ckpt.atomic_write(self.run_dir / "result.json", lambda f: f.write(json.dumps(out, indent=2).encode()))

    def _divergence_message(self, health: Health, _rollbacks: int) -> str:
        good = health.last_good_checkpoint()
        return (f"the run diverged: {health.streak} consecutive bad steps since step {health.streak_start} (limit "
                f"train.max_bad_steps={self.cfg.train.max_bad_steps}; the last: {health.last_reason}); stopping. "
                + (f"The last checkpoint written before it is {good[1]} (step {good[0]}): lower the lr, then --resume"
                   if good else "No checkpoint was written before it: lower the lr and start again"))


def build_classifier(cfg: ClassifyConfig, num_classes: int, ctx: DistContext, device: torch.device, *,
                     load_pretrained: bool = True) -> tuple[nn.Module, dict]:
    """The encoder (task.checkpoint's weights at this resolution, or a random init) under its head, frozen per the
    protocol, with the levers that apply (activation checkpointing, regional compile, FSDP2 under torchrun).
    Returns the model and what was loaded ({"format", "resized", ...})."""
    t, task = cfg.train, cfg.task
    torch.manual_seed(t.seed)
    mae = build_model(cfg.model)
    mae.init_weights(t.seed)
    if task.height and task.height != cfg.model.img_size:
        rectangular(mae, task.height)
    info = {"format": "random init"}
    if task.checkpoint and load_pretrained:  # a resumed run has its own weights in its checkpoint
        info = ckpt.import_weights(mae, task.checkpoint)
    elif task.checkpoint:
        info = {"format": "resumed"}
    probe = task.protocol == "linprobe"
    model = EncoderClassifier(mae, num_classes, pool=task.pool, head="bn_linear" if probe else "linear",
                              drop_path=0.0 if probe else task.drop_path, owns_tokens=True)
    k = 0 if probe else (len(model.blocks) if task.last_blocks < 0 else task.last_blocks)
    model.freeze_all_but_last(k)
    if k == len(model.blocks):  # full fine-tuning: every parameter trains, as in the reference code
        for p in model.parameters():
            p.requires_grad = True
    if task.pool == "gap":  # the encoder's final norm is not on the path (fc_norm is): nothing to train
        for p in model.norm.parameters():
            p.requires_grad = False
    if t.activation_checkpointing:
        apply_activation_checkpointing(mae)
    if t.compile:
        apply_regional_compile(model, t.compile_mode)
    model = model.to(device)
    if ctx.distributed:
        from .parallel import device_mesh

        mesh = device_mesh(device, ctx.world, cfg.parallel.replicate) if cfg.parallel.replicate > 1 else None
        shard_classifier(model, resolve_dtype(t.precision, device), mesh)
    return model, info


def rectangular(mae, height: int) -> None:
    """Make a square-built MAE take images of `height` x its width (task.height): the patch embedding's size and grid,
    and the position embeddings resampled to the rectangular grid (weights loaded afterwards are resampled to it
    from their own grid, engine.checkpoint.fit_pos_embeds). The encoder's path only (fine-tuning, probing)."""
    from .model import resample_pos_embed

    pe = mae.patch_embed
    width, p = pe.img_size[1], pe.patch_size[0]
    pe.img_size, pe.grid_size = (height, width), (height // p, width // p)
    pe.num_patches = pe.grid_size[0] * pe.grid_size[1]
    with torch.no_grad():
        for name in ("pos_embed", "decoder_pos_embed"):
            old = getattr(mae, name)
            setattr(mae, name, nn.Parameter(resample_pos_embed(old.detach(), pe.grid_size), requires_grad=False))


def build_classifier_optimizer(cfg: ClassifyConfig, model: nn.Module, lr: float, device: torch.device):
    """AdamW over timm's layer-wise lr-decay groups (task.optimizer adamw; fused on CUDA), or the probe's LARS."""
    task, o = cfg.task, cfg.optim
    if task.optimizer == "lars":
        return lars([p for p in model.parameters() if p.requires_grad], lr=lr)
    groups = layer_decay_groups(model, o.weight_decay, task.layer_decay)
    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas, **fused)


def build_loss(cfg: ClassifyConfig, num_classes: int):
    """(mixup / cutmix or None, the criterion): soft-target cross-entropy under mixup (its label smoothing inside),
    else label smoothing, else plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    task = cfg.task
    if task.protocol == "finetune" and (task.mixup > 0 or task.cutmix > 0):
        from timm.data import Mixup

        return (Mixup(mixup_alpha=task.mixup, cutmix_alpha=task.cutmix, label_smoothing=task.smoothing,
                      num_classes=num_classes), SoftTargetCrossEntropy())
    return None, LabelSmoothingCrossEntropy(task.smoothing) if task.smoothing > 0 else nn.CrossEntropyLoss()


def shard_classifier(model: EncoderClassifier, param_dtype: torch.dtype | None, mesh=None) -> EncoderClassifier:
    """FSDP2 for a classifier: fully_shard every block, then the root (stem, norms, head); with param_dtype the
    blocks compute with gathered low-precision weights and reduce gradients in fp32 into fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    kw = {} if mesh is None else {"mesh": mesh}
    for blk in model.blocks:
        fully_shard(blk, mp_policy=mp, **kw)
    fully_shard(model, mp_policy=mp, **kw)
    return model


def _frozen_blocks_eval(model: nn.Module) -> None:
    """Frozen blocks stay in eval mode (no drop path); the probe's frozen encoder too."""
    for blk in model.blocks:
        if not any(p.requires_grad for p in blk.parameters()):
            blk.eval()


def _labelled(path, img, batch, cfg: ClassifyConfig, device, *, train: bool, rank: int, world: int,
              auto_augment: str = "", reprob: float = 0.0):
    from pipelines.labelled import LabelledLoader

    return LabelledLoader(path, img, batch, cfg.data, cfg.train.seed, device, train=train, rank=rank, world=world,
                          crop_pct=cfg.task.crop_pct, auto_augment=auto_augment, reprob=reprob)


def _few(names: list[str]) -> str:
    return "[" + ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") + "]"


def run_classify(cfg: ClassifyConfig, resume: bool = False) -> int:
    """`mae finetune` / `mae linprobe`: process group (torchrun), the run, its exit status, teardown."""
    from .parallel import run_job

    def done(r: ClassifyResult) -> None:
        best = (f", best {r.best_top1 * 100:.2f}% at epoch {r.best_epoch:g} ({r.run_dir / 'best.pt'})"
                if r.best_top1 is not None else "")
        top = f"top-1 {r.top1 * 100:.2f}%, top-5 {r.top5 * 100:.2f}%" if r.top1 is not None else "no validation"
        print(f"done: {cfg.task.protocol} step {r.step}, {top}{best}; metrics {r.run_dir / 'metrics.jsonl'}, "
              f"result {r.run_dir / 'result.json'}", flush=True)

    return run_job(cfg.train.device, cfg.train.fsdp,
                   lambda ctx, device: ClassifyRun(cfg, resume=resume, ctx=ctx, device=device), done)
