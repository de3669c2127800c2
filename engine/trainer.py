"""A pretraining run: its set-up (run directory, resume checks, the model and step of engine/step.py, the loader)
and its loop, `fit`: one training step (micro-batches with gradient accumulation, per-step lr, bad steps skipped on
the device), then each part of engine/loop.py at its own time (the health check, the grids, the log line, the save,
a stop signal, the kNN monitor).

Host syncs happen only at the log interval (and at checkpoints): loss sums, finite flags and the
consecutive-bad-step counter stay on the device in between.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.noise import make_noise
from pipelines import build_loader

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .device import autocast
from .errors import DivergenceError
from .health import Health, StopVote
from .loop import Checkpointer, Evaluator, Guard, Job, Loop, StepMeter, StopSignals, resume_parts
from .metrics import MetricsWriter, datasheet_peak, train_flops_per_image
from .model import evaluating
from .optim import lr_at, set_lr
from .run import Run
from .step import build_training, resolve_auto_levers
from .visualize import reconstruction_grid, save_grid


DEMO_TARGET = 0.75  # the held-out masked-patch error the README's first run reaches (see the tiny preset)


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done."""
    last_loss: float | None
    """Mean loss over the last log interval."""
    checkpoint: Path | None
    """The last checkpoint written."""
    run_dir: Path
    interrupted: str | None = None
    """The signal (SIGTERM, SIGUSR1, SIGINT) that stopped the run after a checkpoint, or None when it finished."""
    rollbacks: int = 0
    """How many times a diverging run was rolled back to its last good checkpoint (train.on_divergence)."""
    heldout_error: float | None = None
    """The last masked-patch error on the held-out photographs (runs on the embedded set), 1.0 = patch mean."""


class Trainer(Run):
    """A pretraining run: set up in the constructor (run directory, resume checks, model, step, loader), `fit()` runs
    it through the shared loop (engine/loop.py)."""

    def _setup(self, resume: bool) -> None:
        self._fault_step = _fault_step(self.rank)
        # train.compile / train.cuda_graph at auto take their value for this device here, before anything reads them
        self.cfg, self._levers_line = resolve_auto_levers(self.cfg, self.ctx, self.device,
                                                          fault_injection=self._fault_step is not None)
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:  # temporary files of saves that a kill interrupted (never a live writer's)
            gone = ckpt.remove_stale_temp_files(self.run_dir)
            if gone:
                self.log(f"removed {len(gone)} temporary file(s) of interrupted saves in {self.run_dir}")

        resume_path = None
        self.resume_changes: dict = {}
        self._resume_history: list = []
        if resume:
            resume_path = ckpt.latest_checkpoint(self.run_dir)
            if resume_path is None and self.is_main:
                self.log(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
        if resume_path is not None:  # everything a refusal needs is checked before the directory is touched
            saved_meta = ckpt.read_meta(resume_path)
            if resume_path.is_dir():
                ckpt.read_dcp_metadata(resume_path)
            ckpt.check_training_meta(saved_meta, resume_path)
            saved_cfg = saved_meta.get("config")
            ckpt.check_architecture(saved_cfg, cfg.model, resume_path)
            self._keep_data_backend(saved_meta)
            self._keep_global_batch(saved_meta)
            self.resume_changes = resume_changes(saved_cfg, cfg, int(saved_meta.get("world", 1) or 1), self.world)
            history = saved_meta.get("resumes")
            self._resume_history = list(history) if isinstance(history, list) else []

        if t.cuda_graph and self._fault_step is not None:
            raise ConfigError("train.cuda_graph=true: MAE_FAULT_STEP fault injection raises between forward and "
                              "update; set --train.cuda_graph false")
        torch.manual_seed(t.seed)
        # model, optimizer and the step, every lever applied in one place (engine/step.py)
        self.training = build_training(cfg, self.ctx, self.device)
        self.model, self.optimizer = self.training.model, self.training.optimizer
        self.compute = self.training.compute  # train.precision=bf16-pure: bf16 copies of the weights
        self.effective_batch = t.batch_size * t.accum_steps * self.world
        self.lr = self.training.lr
        if self._fault_step is not None:
            self.training.plain.hooks.append(self._fault_hook)
        self.loader = build_loader(cfg.data, cfg.model.img_size, t.batch_size, self.device, t.seed, self.rank,
                                   self.world, cfg.model.in_chans, quiet=not self.is_main)
        self.steps_per_epoch = self.loader.batches_per_epoch // t.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"one epoch has {self.loader.batches_per_epoch} micro-batch(es) per rank, fewer than "
                              f"train.accum_steps={t.accum_steps}; lower accum_steps or batch_size")
        if t.knn_every and not (cfg.data.knn_train and cfg.data.knn_val):
            raise ConfigError("train.knn_every needs data.knn_train and data.knn_val (labelled image folders)")
        self.total_steps = t.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.stop_at = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        # one masking stream for the global micro-batch, the same on every rank; each rank takes its rows,
        # so a run's masks do not depend on how the global batch is split over ranks
        self.mask_gen = torch.Generator(device=self.device).manual_seed(t.seed * 7919 + 17)
        self.micro_batch = 0  # global micro-batch position of the data stream
        self.parts: dict = {}  # the loop's parts with resume state (fit builds them; meta gathers their state)
        self._parts_state: dict = {}  # what a resumed checkpoint saved of them
        self._knn_loaders = None
        self._heldout = None  # the held-out photographs, on runs of the embedded set (scored at each grid)
        self.heldout_error: float | None = None
        self._pending_heldout: float | None = None
        self._untrained: dict = {}  # the untrained model's predictions for the grids (_untrained_predictions)
        if not cfg.data.path and cfg.model.in_chans == 3:
            from pipelines.common import heldout_images

            self._heldout = heldout_images(cfg.model.img_size, cfg.data.mean, cfg.data.std).to(self.device)
        self.flops_per_image = train_flops_per_image(cfg.model)
        self.peak = datasheet_peak(self.device) if self.device.type == "cuda" else None
        if resume_path is not None:
            self._resume(resume_path)
            self._resumed_from = resume_path
            if self.resume_changes:
                self._resume_history.append({"step": self.step, "checkpoint": resume_path.name,
                                             "time": round(time.time(), 3), "changes": self.resume_changes})
                if self.is_main:
                    shown = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in self.resume_changes.items())
                    self.log(f"note: this resume changes the run: {shown} (recorded in {self.run_dir / 'resumes.jsonl'}"
                             " and in the checkpoints' meta)")
                    with open(self.run_dir / "resumes.jsonl", "a") as f:
                        f.write(json.dumps(self._resume_history[-1]) + "\n")
        if self.is_main:  # the resolved configuration of this run, as `mae pretrain --config` reads it: written
            # once every check passed (a refused run leaves the directory as it was), with the loader `auto` chose
            from dataclasses import replace

            from .config import to_toml

            resolved = replace(cfg, data=replace(cfg.data, backend=self.loader.name))
            ckpt.atomic_write(self.run_dir / "config.toml", lambda f: f.write(to_toml(resolved).encode()))

    def loaders(self) -> list:
        return [getattr(self, "loader", None), *(getattr(self, "_knn_loaders", None) or ())]

    @property
    def graphed(self):
        """The captured step (engine.graphstep) under train.cuda_graph, else None."""
        return self.training.graphed

    def enable_graph(self, capture: bool = True) -> None:
        """Train through engine.graphstep; capture=False runs the graph's body eagerly (any device), which is
        what the CPU tests and `mae bench agreement` hold to the plain step."""
        self.training.enable_graph(capture=capture)

    def _keep_data_backend(self, meta: dict) -> None:
        """A resumed run reads its data with the loader it started with (data.backend auto resolves to DALI once
        DALI is installed): its saved state continues the epoch. An explicit other backend wins, with a note."""
        saved = meta.get("data_backend")
        d = self.cfg.data
        if not saved or saved == d.backend:
            return
        if d.backend == "auto":
            d.backend = saved
            if self.is_main:
                self.log(f"resuming with the {saved} loader the run started with (data.backend auto)")
        elif self.is_main:
            self.log(f"note: the checkpoint was written with the {saved} loader; continuing with {d.backend} as asked "
                     f"(its loader state does not apply: the epoch position is reached by replaying batches)")

    def _keep_global_batch(self, meta: dict) -> None:
        """A resume on another world size keeps the checkpoint's global batch (so its lr and its schedule): the
        per-device batch stays at most what each device held before (it fitted) and the accumulation makes up the
        rest; refused, naming both world sizes and an override that fits, when no split exists. The config's
        own batch settings win when they already give the saved global batch, or with train.on_world_change
        follow."""
        saved_world = int(meta.get("world", 1))
        saved = (meta.get("config") or {}).get("train") or {}
        t = self.cfg.train
        if saved_world == self.world or "batch_size" not in saved:
            return
        target = int(saved["batch_size"]) * int(saved.get("accum_steps", 1)) * saved_world
        current = t.batch_size * t.accum_steps * self.world
        if current == target:
            return
        if t.on_world_change == "follow":
            if self.is_main:
                self.log(f"note: resumed on {self.world} rank(s) from a run on {saved_world}: global batch {current} "
                         f"instead of {target} as given (train.on_world_change follow: the lr and the schedule "
                         "follow the new batch)")
            return
        cap = max(int(saved["batch_size"]), t.batch_size)  # what one device is known to hold
        split = next(((target // (self.world * a), a) for a in range(1, 1025)
                      if target % (self.world * a) == 0 and target // (self.world * a) <= cap), None)
        if split is None:
            fits = [(b, a) for a in range(1, 1025) for b in (target // (self.world * a),)
                    if b >= 1 and target % (self.world * a) == 0]
            hint = (f"--train.batch_size {fits[0][0]} --train.accum_steps {fits[0][1]}" if fits else
                    "a world size that divides it")
            raise ConfigError(
                f"resuming a run saved on {saved_world} rank(s) (global batch {target} = {saved['batch_size']} x "
                f"{saved.get('accum_steps', 1)} x {saved_world}) on {self.world} rank(s): {target} images do not "
                f"split into equal per-device batches of at most {cap}; use {hint}, or "
                "--train.on_world_change follow to continue with a different global batch (lr and schedule change)")
        b, a = split
        if self.is_main:
            self.log(f"resumed on {self.world} rank(s) from a run on {saved_world}: global batch {target} kept as "
                     f"{b} per device x {a} accumulation x {self.world} rank(s) (was {t.batch_size} x {t.accum_steps})")
        t.batch_size, t.accum_steps = b, a

    def _fault_hook(self, phase: str) -> None:
        if phase == "optimizer" and self._fault_step == self.step + 1:
            raise RuntimeError(f"injected fault (MAE_FAULT_STEP={self._fault_step}) on rank {self.rank} "
                               f"at step {self._fault_step}")

    # ------------------------------------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            **self.position_meta(self.loader.batches_per_epoch),
            "rng": ckpt.capture_rng({"mask": self.mask_gen}),
            "loader": self._loader_states(),
            "data_backend": self.loader.name,
            "resumes": self._resume_history,
            **({"loss_scale": self.training.plain.scaler.state_dict()} if self.training.plain.scaler else {}),
        }

    def _loader_states(self) -> list | None:
        """Every rank's loader state (DALI's pipeline checkpoint), gathered for rank 0's meta."""
        if not hasattr(self.loader, "state_dict"):
            return None
        mine = self.loader.state_dict()
        if self.ctx.distributed and self.world > 1:
            import torch.distributed as dist

            states = [None] * self.world
            dist.all_gather_object(states, mine)
            return states
        return [mine]

    def _resume(self, path: Path) -> None:
        meta = ckpt.load_training_checkpoint(path, self.model, self.optimizer, self.cfg.model)
        ckpt.check_training_meta(meta, path)
        self.step = int(meta["step"])
        per_micro = self.cfg.train.batch_size * self.world
        seen = int(meta["data"].get("samples_seen", meta["data"]["micro_batch"] * per_micro))
        self.micro_batch = seen // per_micro
        if seen % per_micro and self.is_main:
            self.log(f"warning: {seen} samples seen is not a whole number of global micro-batches of {per_micro}; "
                     f"resuming at sample {self.micro_batch * per_micro}")
        try:
            ckpt.restore_rng(meta["rng"], {"mask": self.mask_gen})
        except (RuntimeError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: its random-generator states cannot be restored "
                                       f"({type(e).__name__}: {str(e)[:120]})") from None
        self._parts_state = meta.get("parts") if isinstance(meta.get("parts"), dict) else {}
        if self.training.plain.scaler is not None and isinstance(meta.get("loss_scale"), dict):
            self.training.plain.scaler.load_state_dict(meta["loss_scale"])  # fp16: the scale the run had reached
        states = meta.get("loader")
        if states and len(states) == self.world and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(states[self.rank])
        if self.is_main:
            self.log(f"resumed from {path} at step {self.step} (epoch {meta['data']['epoch']}"
                     + (f", saved on {meta['world']} rank(s)" if meta.get("world", 1) != self.world else "") + ")")

    def save(self) -> Path:
        return ckpt.save_training_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.meta(),
                                             self.cfg.train.keep_last, sharded=self.ctx.distributed,
                                             is_main=self.is_main)

    def autocast(self, evaluation: bool = False):
        """The training step's autocast; `evaluation=True` also autocasts bf16-pure runs on CUDA (evaluation
        runs the fp32 master model)."""
        dtype = self.amp_dtype
        if evaluation and dtype is None and self.compute is not None and self.device.type == "cuda":
            dtype = torch.bfloat16
        return autocast(self.device, dtype)

    def _sharding(self) -> str:
        r = self.cfg.parallel.replicate
        return f" (HSDP: {r} replicas x {self.world // r} shards)" if r > 1 else " (FSDP2)"

    def _precision(self) -> str:
        if self.cfg.train.precision == "fp8":
            from .fp8 import describe

            return describe(self.model, self.cfg.train.fp8_recipe)
        return str(self.amp_dtype or torch.float32)

    def banner(self) -> str:
        t, m = self.cfg.train, self.cfg.model
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"preset {self.cfg.preset}: {n_params / 1e6:.2f}M parameters, {m.img_size}px, patch {m.patch_size}, "
                f"mask ratio {m.mask_ratio} ({m.len_keep}/{m.num_patches} patches visible)\n"
                f"device {self.device}, precision {self._precision()}, data {self.loader.name} "
                f"({self.loader.batches_per_epoch} micro-batches/epoch/rank)\n"
                f"effective batch {self.effective_batch} = {t.batch_size} per device x {t.accum_steps} accumulation "
                f"x {self.world} rank(s)" + (self._sharding() if self.ctx.distributed else "") + f"; lr {self.lr:.3g} "
                + ("(absolute)" if self.cfg.optim.lr > 0 else
                   f"= base {self.cfg.optim.base_lr:g} x {self.effective_batch}/256")
                + f"\n{self._levers_line}"
                + f"\n{self.total_steps} steps ({t.epochs} epochs x {self.steps_per_epoch}), warm-up "
                f"{self.warmup_steps}, stopping at step {self.stop_at}; run dir {self.run_dir}")

    # ------------------------------------------------------------------------------------------------------

    def optimizer_step(self, stream) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over accum_steps micro-batches. Returns (mean loss, finite flag), on device."""
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.warmup_steps, self.lr, self.cfg.optim.min_lr))
        micro_batches = (self._next_micro_batch(stream) for _ in range(self.cfg.train.accum_steps))
        loss, finite = self.training.step_fn(micro_batches)  # plain or captured: the same body (engine/step.py)
        self.step += 1
        return loss, finite  # a captured step's static outputs: fit() reads them before the next step

    def _train_step(self, stream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, finite = self.optimizer_step(stream)
        return loss, self.training.step_fn.grad_norm, finite

    def _next_micro_batch(self, stream) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch and its mask noise: the noise is drawn for the global micro-batch from
        the shared mask stream and sliced, so masks do not depend on the world size (or on the graph)."""
        m = self.cfg.model
        imgs = next(stream)
        self.micro_batch += 1
        b = imgs.shape[0]
        noise = make_noise(m.mask_strategy, b * self.world, m.grid_size, m.mask_ratio, self.mask_gen, self.device)
        return imgs, noise[self.rank * b:(self.rank + 1) * b]

    def fit(self) -> TrainResult:
        """The loop (engine/loop.py's Loop, shared with fine-tuning and probing): a training step, then each part at
        its own time: the health check (at a log line or a save), the grids, the log line, the save, a stop
        signal, the kNN monitor."""
        t = self.cfg.train
        if self.is_main:
            self.log(self.banner())
        self._last_loss = None
        writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard, enabled=self.is_main, resume_step=self.step)
        bar = self.progress_bar(self.stop_at)
        say = bar.write if bar is not None else self.log
        stream, vis_imgs = self._stream_and_grid_images()
        health = self.start_health(self.training.plain.param_norm)
        meter = StepMeter(self.device, self.world, self.effective_batch, t.log_every, self.stop_at)
        guard = Guard(health, self.training.plain.param_norm, max_bad_steps=t.max_bad_steps,
                      on_divergence=t.on_divergence, max_rollbacks=t.max_rollbacks,
                      rollback=lambda h, n: self._rollback(h, say, n), diverged=self._divergence_message)
        saver = Checkpointer(self.save, t.ckpt_every, self.stop_at, health, self.is_main)
        self.parts = resume_parts({"guard": guard}, self._parts_state)  # meta() gathers their state
        evals = Evaluator(t.vis_every, t.knn_every, self.steps_per_epoch, self.stop_at, grids=vis_imgs is not None)
        jobs = [Job(evals.grids_due, lambda: self.write_reconstruction(vis_imgs, writer), "before_log"),  # the log
                # record carries the held-out error
                Job(lambda step, stop: evals.knn_due(step), lambda: self._knn_line(writer, say), "after_save")]
        loop = Loop(meter=meter, guard=guard, saver=saver, vote=StopVote(self.device, self.ctx.distributed),
                    signals=StopSignals(self.is_main), jobs=jobs, say=say, bar=bar,
                    log_line=lambda: self._log_line(meter, health, writer, bar, say))
        try:
            stop_signal = loop.run(lambda: self._train_step(stream), lambda: self.step, self.stop_at)
            if stop_signal and self.is_main:
                say(self._stopped_line(stop_signal, saver.last, health))
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            stream.close()
            self.close()  # every way the loop ends stops the loaders' workers and releases the run directory
        if self.is_main:
            self._closing_lines(say)
        if health.in_streak and not stop_signal:
            raise DivergenceError(self._ended_in_streak_message(health))
        return TrainResult(self.step, self._last_loss, saver.last, self.run_dir, stop_signal, guard.rollbacks,
                           self.heldout_error)

    def _stopped_line(self, stop_signal: str, last: Path | None, health: Health) -> str:
        what = f"saved {last} at step {self.step}" if not health.in_streak else (
            f"did not save (bad streak); the last good checkpoint is {health.last_good_checkpoint()}")
        return f"received {stop_signal}: {what}; continue with --resume"

    def _knn_line(self, writer, say) -> None:
        acc = self.knn_monitor()
        writer.log(self.step, knn_top1=acc)
        if self.is_main:
            say(f"kNN monitor at epoch {self.step // self.steps_per_epoch}: top-1 {acc * 100:.2f}%")

    def _stream_and_grid_images(self):
        """The data stream, and the first batch's first four images for the reconstruction grids (that batch still
        trains); no images when the run has no step left."""
        stream = self.loader.stream(self.micro_batch)
        if self.step >= self.stop_at:
            return stream, None
        first = next(stream)
        return _chain_first(first, stream), first[:4].detach().clone()

    def _log_line(self, meter: StepMeter, health: Health, writer, bar, say) -> None:
        """The window's record into metrics.jsonl / TensorBoard, the progress line, the warnings of the window."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        rec = meter.record(self.step, self.steps_per_epoch, lr, self.flops_per_image, self.peak)
        if self.training.plain.scaler is not None:  # fp16: the loss scale and the overflow steps so far
            rec.update(loss_scale=float(self.training.plain.scaler.scale),
                       overflows=int(self.training.plain.scaler.overflows))
        self._last_loss = rec["loss"]
        if self._pending_heldout is not None:
            rec["heldout_error"], self._pending_heldout = round(self._pending_heldout, 5), None
        writer.log(self.step, **rec)
        ips = meter.last_ips
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        elif self.is_main:
            eta = (self.stop_at - self.step) * meter.last_dt / meter.steps
            say(f"step {self.step}/{self.stop_at} loss {rec['loss']:.4f} lr {lr:.3e} {ips:.1f} img/s "
                f"eta {_clock(eta)}")
        if rec["skipped"] and self.is_main:
            say(f"warning: skipped {rec['skipped']} step(s) with a non-finite loss or gradient before step "
                f"{self.step}; parameters were not updated on those steps")
        if health.longest and self.is_main:
            say(f"warning: {health.longest} consecutive bad step(s) by step {self.step}: {health.last_reason}")
        health.reset_longest()
        meter.reset()

    def _closing_lines(self, say) -> None:
        from .metrics import read_metrics
        from .visualize import write_loss_curve

        write_loss_curve(read_metrics(self.run_dir), self.run_dir / "loss.png", f"{self.cfg.preset}, {self.run_dir}")
        if self.heldout_error is not None:
            target = f"; the tiny preset's target is <= {DEMO_TARGET}" if self.cfg.preset == "tiny" else ""
            before = self._untrained.get("heldout_error")
            say(f"held-out masked-patch error {self.heldout_error:.3f} on {len(self._heldout)} images never "
                f"trained on (" + (f"untrained {before:.3f}, " if before is not None else "")
                + f"1.000 = predicting each patch's mean{target}); "
                f"grids in {self.run_dir / 'recon'}, curve in {self.run_dir / 'loss.png'}")

    def _ended_in_streak_message(self, health: Health) -> str:
        good = health.last_good_checkpoint()
        where = (f"the last good checkpoint is {good[1]} (step {good[0]}): lower the lr or check the data, then "
                 "--resume from it" if good else "no good checkpoint was written: lower the lr or check the data and "
                 "start again")
        return (f"the run ended inside a bad streak: {health.streak} bad step(s) since step {health.streak_start} "
                f"({health.last_reason}); the weights at step {self.step} were not saved; {where}")

    def _divergence_message(self, health: Health, rollbacks: int) -> str:
        good = health.last_good_checkpoint()
        where = (f"the last checkpoint written before it is {good[1]} (step {good[0]})" if good else
                 "no checkpoint was written before it")
        return (f"the run diverged: {health.streak} consecutive bad steps since step {health.streak_start} (limit "
                f"train.max_bad_steps={self.cfg.train.max_bad_steps}; the last: {health.last_reason})"
                + (f", after {rollbacks} rollback(s)" if rollbacks else "")
                + f"; stopping. {where[0].upper() + where[1:]}; no checkpoint was written during the streak. Lower "
                + ("the lr or check the data, then --resume from it (or train.on_divergence rollback)" if good else
                   "the lr or check the data and start again"))

    def _rollback(self, health: Health, say, n: int) -> None:
        """Reload the last checkpoint written before the bad streak and go on with the data after the offending
        batches (the stream is not rewound); the mask stream goes on too, so the masks differ from the first try."""
        good = health.last_good_checkpoint()
        if good is None:
            raise DivergenceError(self._divergence_message(health, n - 1))
        step, path = good
        ckpt.load_training_checkpoint(path, self.model, self.optimizer, self.cfg.model)
        if self.compute is not None:
            self.compute.refresh()
        if self.graphed is not None:  # the captures point at the replaced optimizer state: capture again
            self.graphed.reset()
        if self.is_main:
            say(f"warning: rolling back to {path} (step {step}) after {health.streak} bad steps since step "
                f"{health.streak_start} ({health.last_reason}); the batches since are skipped "
                f"(rollback {n} of at most {self.cfg.train.max_rollbacks})")
        self.step = step
        health.restart()
        health.observe_weights(step, float(self.training.plain.param_norm()))

    def knn_monitor(self) -> float:
        """kNN top-1 (k=20, cosine, T=0.07) of the current encoder on data.knn_val against data.knn_train.
        Every rank extracts the features (FSDP gathers the encoder collectively); rank 0 logs."""
        from pipelines.labelled import LabelledLoader

        from .evaluate import knn_eval

        d = self.cfg.data
        if self._knn_loaders is None:
            img = self.cfg.model.img_size
            self._knn_loaders = (LabelledLoader(d.knn_train, img, 256, d, 0, self.device, train=False),
                                 LabelledLoader(d.knn_val, img, 256, d, 0, self.device, train=False))
        with evaluating(self.model), self.autocast(evaluation=True):
            return knn_eval(self.model, *self._knn_loaders, self.device).top1

    def write_reconstruction(self, imgs: torch.Tensor, writer=None) -> Path:
        """The grid of `imgs` (the run's first batch) at this step; on the embedded set also the grid of the held-out
        photographs and their masked-patch error (metrics.jsonl, recon/heldout.json, TensorBoard)."""
        m, d = self.cfg.model, self.cfg.data
        scale = max(1, 128 // m.img_size)

        def noise_for(n):  # the same masks every time (the grids of a run compare), with the run's mask strategy
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 4242)
            return make_noise(m.mask_strategy, n, m.grid_size, m.mask_ratio, gen, self.device)

        show = self._heldout[:: max(1, len(self._heldout) // 5)][:5] if self._heldout is not None else None
        # every rank runs the forwards (FSDP gathers weights collectively); rank 0 writes
        with self.autocast(evaluation=True):
            before = self._untrained_predictions(imgs, show, noise_for) if self.is_main else {}
            grid = reconstruction_grid(self.model, imgs, d.mean, d.std, m.mask_ratio, noise_for(imgs.shape[0]),
                                       scale=scale, untrained=before.get("train"))
            held = None
            if self._heldout is not None:
                from .visualize import masked_patch_error

                self.heldout_error = masked_patch_error(self.model, self._heldout, m.mask_ratio,
                                                        strategy=m.mask_strategy)
                held = reconstruction_grid(self.model, show, d.mean, d.std, m.mask_ratio, noise_for(len(show)),
                                           scale=scale, untrained=before.get("heldout"))
        path = self.run_dir / "recon" / f"step_{self.step:08d}.png"
        if not self.is_main:
            return path
        save_grid(grid, path)
        if writer is not None:
            writer.image("reconstruction/train", self.step, grid)
        if held is not None:
            save_grid(held, self.run_dir / "recon" / f"heldout_step_{self.step:08d}.png")
            ckpt.atomic_write(self.run_dir / "recon" / "heldout.json", lambda f: f.write(json.dumps({
                "step": self.step, "heldout_error": self.heldout_error, "baseline_patch_mean": 1.0,
                "untrained": self._untrained.get("heldout_error"),
                "target": DEMO_TARGET if self.cfg.preset == "tiny" else None, "images": len(self._heldout)},
                indent=2).encode()))
            self._pending_heldout = self.heldout_error  # into this step's (or the next) log record
            if writer is not None:
                writer.image("reconstruction/heldout", self.step, held)
        return path

    def _untrained_predictions(self, imgs: torch.Tensor, show: torch.Tensor | None, noise_for) -> dict:
        """The untrained model's predictions for the grids' images (the run's own initial weights, rebuilt from its
        seed once per process and dropped: a grid costs no model copy) and its held-out error, cached."""
        from .visualize import initial_model, masked_patch_error, predict

        seen = self._untrained.get("imgs")  # a copy, compared by content: a new batch may reuse the old memory
        if seen is None or seen.shape != imgs.shape or not torch.equal(seen, imgs):
            m = self.cfg.model
            model = initial_model(self.cfg, self.device)
            self._untrained = {"imgs": imgs.detach().clone(),
                               "train": predict(model, imgs, m.mask_ratio, noise_for(imgs.shape[0]))}
            if show is not None:
                self._untrained["heldout"] = predict(model, show, m.mask_ratio, noise_for(len(show)))
                self._untrained["heldout_error"] = round(masked_patch_error(
                    model, self._heldout, m.mask_ratio, strategy=m.mask_strategy), 5)
            del model
        return self._untrained


RESUME_WATCHED = (("model", "mask_ratio"), ("model", "mask_strategy"), ("model", "norm_pix_loss"),
                  ("train", "batch_size"), ("train", "accum_steps"), ("train", "epochs"), ("train", "precision"),
                  ("optim", "lr"), ("optim", "base_lr"), ("optim", "min_lr"), ("optim", "weight_decay"),
                  ("optim", "warmup_epochs"))
"""The settings whose change on a resume alters what the run learns: reported and recorded (old -> new)."""


def resume_changes(saved: dict | None, cfg: Config, saved_world: int, world: int) -> dict:
    """{"section.field": [old, new]} for the watched settings a resume changes, and the global batch."""
    if not isinstance(saved, dict):
        return {}
    now = cfg.to_dict()
    out = {}
    for section, field in RESUME_WATCHED:
        old_sec = saved.get(section)
        if not isinstance(old_sec, dict) or field not in old_sec:
            continue
        old, new = old_sec[field], now[section][field]
        if old != new:
            out[f"{section}.{field}"] = [old, new]
    tr = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    try:
        old_global = int(tr["batch_size"]) * int(tr.get("accum_steps", 1)) * saved_world
    except (KeyError, TypeError, ValueError):
        return out
    new_global = cfg.train.batch_size * cfg.train.accum_steps * world
    if old_global != new_global:
        out["global_batch"] = [old_global, new_global]
    return out


def _clock(seconds: float) -> str:
    """h:mm:ss (days as a prefix) for a log line's ETA."""
    s = int(max(0.0, seconds) + 0.5)
    d, s = divmod(s, 86400)
    return (f"{d}d " if d else "") + f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fault_step(rank: int) -> int | None:
    """Fault injection for crash-handling tests: MAE_FAULT_STEP=S (and MAE_FAULT_RANK=R) make that rank raise
    at step S."""
    import os

    fs = os.environ.get("MAE_FAULT_STEP")
    return int(fs) if fs and int(os.environ.get("MAE_FAULT_RANK", "0")) == rank else None


def _chain_first(first, stream):
    yield first
    yield from stream
