"""Entry point of pretraining under torchrun: the `mae pretrain` command (engine.cli), run as a module.

    mae pretrain ...                                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m engine.pretrain ...        # FSDP2 on 8 GPUs (or `mae pretrain` under torchrun)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    from .cli import main as cli_main

    return record(cli_main)(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
