"""`mae data check DIR`: registered with the `mae` command."""

from __future__ import annotations

from collections import Counter


def _os_errors(fn):
    """A file-system failure (a read-only or full directory) is one line naming the path, not a traceback."""
    import functools

    @functools.wraps(fn)
    def run(args, extra):
        from pipelines.common import DataError

        try:
            return fn(args, extra)
        except OSError as e:
            where = e.filename or getattr(args, "out", None) or getattr(args, "dir", "")
            raise DataError(f"cannot write or read {where}: {e.strerror or e}; files already written are "
                            "intact") from None

    return run


@_os_errors
def cmd_data_check(args, extra) -> int:
    from pipelines.check import MAX_PIXELS, default_quarantine_path, scan, write_quarantine
    from pipelines.shards import find_manifest, open_shards

    if find_manifest(args.dir) is not None:  # a packed dataset: its manifest and every index against its tar
        shards = open_shards(args.dir)
        if shards.outside:
            print(f"packed dataset {args.dir}: {len(shards.shards)} shard(s), {len(shards)} samples; "
                  f"{len(shards.outside)} index entries lie outside their tar (DALI refuses the set; torchvision "
                  "skips them):")
            for line in shards.outside[:20]:
                print(f"  BAD {line}")
            print("pack the source again (`mae data pack` rewrites a truncated shard)")
            return 1
        print(f"packed dataset {args.dir}: {len(shards.shards)} shard(s), {len(shards)} samples; the manifest and "
              "every index entry are consistent with the tars (images were checked when packed)")
        return 0
    findings = scan(args.dir, workers=args.workers, max_pixels=args.max_pixels or MAX_PIXELS,
                    decode=not args.fast)
    counts = Counter(f.kind for f in findings)
    bad = [f for f in findings if f.bad or (args.strict and f.kind in ("grayscale", "png"))]
    print(f"checked {len(findings)} file(s) in {args.dir}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for f in findings:
        if f.kind != "ok" and (f.bad or args.verbose or args.strict):
            print(f"  {'BAD ' if f in bad else 'note'} {f.kind:15s} {f.path}: {f.detail}")
    notes = sum(1 for f in findings if f.kind in ("grayscale", "png")) if not args.strict else 0
    if notes and not args.verbose:
        print(f"  ({notes} grayscale/PNG file(s) decode fine in both backends; --verbose lists them, "
              "--strict quarantines them)")
    out = args.out or default_quarantine_path(args.dir)
    n = write_quarantine(findings, out, strict=args.strict)
    if n:
        print(f"wrote quarantine list {out} ({n} file(s)); both backends skip them "
              + ("automatically" if not args.out else f"with --data.quarantine {out}"))
        return 1
    print(f"no bad files; wrote an empty quarantine list {out}")
    return 0


@_os_errors
def cmd_data_pack(args, extra) -> int:
    from pipelines.shards import pack, parse_size

    if bool(args.shard_size) == bool(args.per_shard):
        from .options import UserError

        raise UserError("give one of --shard-size (e.g. 1GB) or --per-shard N")
    m = pack(args.src, args.out, shard_bytes=parse_size(args.shard_size) if args.shard_size else None,
             per_shard=args.per_shard or None, seed=args.seed, labels=args.labels,
             check="none" if args.no_check else ("header" if args.fast else "full"), workers=args.workers,
             progress=not args.quiet)
    print(f"wrote {len(m['shards'])} shard(s), {m['samples']} samples, {m['bytes'] / 2**20:.1f} MiB to {args.out} "
          f"(manifest {args.out}/manifest.json; train with --data.path {args.out})")
    if m["left_out"]:
        print(f"left out {len(m['left_out'])} file(s) that `mae data check` flags (listed in the manifest): "
              + ", ".join(f"{x['path']} ({x['why']})" for x in m["left_out"][:5])
              + (" ..." if len(m["left_out"]) > 5 else ""))
    return 0


def cmd_digits(args, extra) -> int:
    from pipelines.labelled import export_digits

    n_train, n_val = export_digits(args.out, args.img_size, seed=args.seed)
    print(f"wrote scikit-learn's digits to {args.out}/train ({n_train} images) and {args.out}/val ({n_val}), "
          f"{args.img_size}px RGB, one folder per digit")
    return 0


def register(sub) -> None:
    d = sub.add_parser("data", help="data tools: `mae data check DIR`, `mae data pack SRC OUT`, `mae data digits`")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("check", help="find undecodable, CMYK, mislabelled, huge or empty images; write a "
                                      "quarantine list; exit 1 when any")
    c.add_argument("dir")
    c.add_argument("--out", default="", help="quarantine list path (default DIR/.mae_quarantine.txt)")
    c.add_argument("--workers", type=int, default=0)
    c.add_argument("--max-pixels", type=int, default=0, help="largest image accepted (default PIL's 89.5 MP)")
    c.add_argument("--fast", action="store_true", help="headers only, no full decode (misses truncation)")
    c.add_argument("--strict", action="store_true", help="also quarantine grayscale images and PNGs")
    c.add_argument("--verbose", action="store_true")
    c.set_defaults(func=cmd_data_check)
    pk = dsub.add_parser("pack", help="pack an image directory into webdataset tar shards with DALI index files and "
                                      "a manifest (resumable); --data.path then reads the shards")
    pk.add_argument("src")
    pk.add_argument("out")
    pk.add_argument("--shard-size", default="", help="about this many bytes per shard, e.g. 1GB")
    pk.add_argument("--per-shard", type=int, default=0, help="or this many samples per shard")
    pk.add_argument("--seed", type=int, default=0, help="the order of the samples (a permutation) is this seed's")
    pk.add_argument("--labels", action="store_true", help="also a {key}.cls member: the class subfolder's index")
    pk.add_argument("--fast", action="store_true", help="check headers only (misses truncated images)")
    pk.add_argument("--no-check", action="store_true", help="pack every image file unchecked")
    pk.add_argument("--workers", type=int, default=0)
    pk.add_argument("--quiet", action="store_true", help="no progress bar")
    pk.set_defaults(func=cmd_data_pack)
    g = dsub.add_parser("digits", help="write scikit-learn's handwritten digits as a labelled image folder")
    g.add_argument("out")
    g.add_argument("--img-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_digits)
