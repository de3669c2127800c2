"""`mae-torchrun`: torchrun, the same options, with an exit code that tells a pre-emption from a failure.

torchrun forwards a SIGTERM (or SIGINT) to its workers; the engine's ranks then agree on a step, write the
checkpoint together and exit 128 + the signal. torchrun itself, though, ends such a job with exit code 1 and a
traceback, as it does a crash, so a scheduler cannot tell "pre-empted, resume me" from "failed". This launcher
runs torchrun's own `run` and maps those cases:

- the launcher was signalled (SignalException) after its workers stopped: exit 128 + the signal (143 for SIGTERM);
- every failed worker exited 128 + a stop signal (143 SIGTERM, 138 SIGUSR1, 130 SIGINT): that code;
- anything else is torchrun's own outcome (its error report, exit 1).

    mae-torchrun --nproc_per_node=8 -m engine.pretrain --preset vit-h --data /data/train --run-dir runs/vith
"""

from __future__ import annotations

import sys

STOP_CODES = {143: "SIGTERM", 138: "SIGUSR1", 130: "SIGINT"}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)  # as torchrun: a failed rank's error file and summary


def _main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as e:
        code = 128 + int(e.sigval)
        print(f"mae-torchrun: stopped by {e.sigval.name}; the ranks wrote their checkpoint before exiting "
              f"(exit {code}: resume with --resume)", file=sys.stderr)
        return code
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if len(codes) == 1 and next(iter(codes)) in STOP_CODES:
            code = next(iter(codes))
            print(f"mae-torchrun: the ranks stopped on {STOP_CODES[code]} after writing their checkpoint "
                  f"(exit {code}: resume with --resume)", file=sys.stderr)
            return code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
