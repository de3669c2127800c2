"""Pretraining run: process group, trainer, fit, exit code, teardown (called by `mae pretrain` and by
`python -m engine.pretrain` under torchrun)."""

from __future__ import annotations

from ..config import Config


def run_pretrain(cfg: Config, resume: bool = False) -> int:
    from ..parallel import run_job
    from ..trainer import Trainer

    def done(result) -> None:
        loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
        print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}, "
              f"metrics {result.run_dir / 'metrics.jsonl'}, reconstructions {result.run_dir / 'recon'}", flush=True)

    return run_job(cfg.train.device, cfg.train.fsdp,
                   lambda ctx, device: Trainer(cfg, resume=resume, ctx=ctx, device=device), done)
