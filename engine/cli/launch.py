"""Pretraining run: process group, trainer, fit, exit code, teardown (called by `mae pretrain` and by
`python -m engine.pretrain` under torchrun)."""

from __future__ import annotations

from ..config import Config


def run_pretrain(cfg: Config, resume: bool = False) -> int:
    from .. import parallel
    from ..trainer import Trainer

    ctx, device = parallel.init_distributed(cfg.train.device, fsdp=cfg.train.fsdp)
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, ctx=ctx, device=device)
        result = trainer.fit()
        if result.interrupted:
            import signal

            sig = getattr(signal, result.interrupted, None) if result.interrupted.startswith("SIG") else None
            return 128 + int(sig if sig is not None else signal.SIGTERM)  # 143 / 138 / 130: stopped by a signal
        if ctx.is_main:
            loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
            print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}, "
                  f"metrics {result.run_dir / 'metrics.jsonl'}, reconstructions {result.run_dir / 'recon'}",
                  flush=True)
    finally:
        # free the model, optimizer and loader (FSDP2 state sits in reference cycles) while the interpreter and
        # the process group are alive: collective work objects left for interpreter shutdown can take the
        # process down in the communication library's threads after a successful run
        trainer = None
        import gc

        gc.collect()
        parallel.destroy_distributed()
    return 0
