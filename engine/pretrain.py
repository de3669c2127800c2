"""Entry point of pretraining: parse, build, train, close (`python -m engine.pretrain` = `mae pretrain`)."""

from __future__ import annotations

import sys

from .config import Config


def run_pretrain(cfg: Config, resume: bool = False) -> int:
    from .trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    result = trainer.fit()
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}, "
          f"metrics {result.run_dir / 'metrics.jsonl'}, reconstructions {result.run_dir / 'recon'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
