"""Sharded datasets: webdataset-layout tar shards, their DALI index files and a manifest.

Large datasets are millions of small files; listing and opening them one by one on a shared file system is
what stalls a run. `mae data pack SRC OUT` writes them instead into tar shards of about --shard-size bytes (or
--per-shard samples):

    OUT/shard-000000.tar    members {key}.jpg (the original bytes, any image format under its own extension)
                            and, with --labels, {key}.cls (the class index, as text)
    OUT/shard-000000.idx    DALI's index of the shard (wds2idx's format v1.2: component, offset, size, name)
    OUT/manifest.json       shards (name, samples, bytes, first key), total, classes, the source, the date, the
                            seed, and the files left out (those `mae data check` flags, with the reason)

The order is a permutation of the source's files given by --seed (shards are random subsets). A pack is
resumable: every shard is written under a temporary name and renamed when complete, and `.manifest.partial.json`
records the shards done; a killed pack started again continues after them, the same samples in the same shards.

Reading (`open_shards`): `--data.path` names OUT or its manifest.json. Both backends read the shards: DALI with
fn.readers.webdataset and the index files (pipelines/dali.py), the torchvision backend in plain Python through the
same index (each sample read by offset with one seek, decoded with PIL). Sample i of the dataset is the i-th line
over the shards in manifest order.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .common import IMAGE_EXTS, DataError, atomic_write, walk_files

MANIFEST = "manifest.json"
PARTIAL = ".manifest.partial.json"
INDEX_VERSION = "v1.2"


def parse_size(text: str) -> int:
    """'1GB' / '512MB' / '64k' / '1000' -> bytes."""
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("T", 1 << 40),
                       ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            t, m = t[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        n = int(float(t) * m)
    except ValueError:
        raise DataError(f"--shard-size must be a size such as 1GB or 512MB, got {text!r}") from None
    if n <= 0:
        raise DataError(f"--shard-size must be positive, got {text!r}")
    return n


@dataclass
class Sample:
    path: str
    label: int | None


def plan_shards(samples: list[Sample], shard_bytes: int | None, per_shard: int | None) -> list[list[Sample]]:
    """Cut the ordered samples into shards of at most `per_shard` samples or about `shard_bytes` bytes (a shard
    closes once it holds that many; every shard holds at least one sample)."""
    shards, cur, size = [], [], 0
    for s in samples:
        nbytes = os.path.getsize(s.path) + 1024  # the member and its headers
        if cur and ((per_shard and len(cur) >= per_shard) or (shard_bytes and size + nbytes > shard_bytes)):
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _write_shard(path: Path, samples: list[Sample], first_key: int) -> tuple[int, list[str]]:
    """Write one tar shard and its index (both atomically); returns (bytes, index lines)."""
    lines = []

    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, s in enumerate(samples):
                key = f"{first_key + i:09d}"
                ext = os.path.splitext(s.path)[1].lower().lstrip(".") or "jpg"
                ext = "jpg" if ext == "jpeg" else ext
                comps = [(ext, Path(s.path).read_bytes())]
                if s.label is not None:
                    comps.append(("cls", str(s.label).encode()))
                line = []
                for e, data in comps:
                    info = tarfile.TarInfo(f"{key}.{e}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    start = tar.offset
                    tar.addfile(info, io.BytesIO(data))
                    line.append(f"{e} {start + 512} {len(data)} {key}.{e}")  # data follows a 512-byte header
                lines.append(" ".join(line))

    atomic_write(path, write)
    atomic_write(path.with_suffix(".idx"), lambda f: f.write(
        (f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n").encode()))
    return path.stat().st_size, lines


def pack(src: str, out: str, shard_bytes: int | None = None, per_shard: int | None = None, seed: int = 0,
         labels: bool = False, check: str = "full", workers: int = 0, progress: bool = True, log=print) -> dict:
    """Pack the images under `src` into shards in `out` (see the module docstring); returns the manifest."""
    from .check import scan

    if not (shard_bytes or per_shard):
        raise DataError("give --shard-size (e.g. 1GB) or --per-shard N")
    root = Path(src)
    outdir = Path(out)
    if outdir.resolve() == root.resolve() or root.resolve() in outdir.resolve().parents:
        raise DataError(f"the output {outdir} must not be inside the source {root}")
    findings = scan(str(root), workers=workers, decode=check == "full") if check != "none" else []
    bad = {f.path: f"{f.kind}: {f.detail}" for f in findings if f.bad and f.path.lower().endswith(IMAGE_EXTS)}
    files = [f for f in walk_files(root) if f.lower().endswith(IMAGE_EXTS) and f not in bad]
    if not files:
        raise DataError(f"no usable images under {root}" + (f" ({len(bad)} flagged)" if bad else ""))
    classes: list[str] = []
    if labels:
        classes = sorted({Path(f).relative_to(root).parts[0] for f in files if len(Path(f).relative_to(root).parts) > 1})
        if len(classes) < 2:
            raise DataError(f"--labels needs one subfolder per class under {root}; found {len(classes)}")
    cidx = {c: i for i, c in enumerate(classes)}
    samples = [Sample(f, cidx.get(Path(f).relative_to(root).parts[0]) if labels else None) for f in files]
    random.Random(seed).shuffle(samples)  # a permutation given the seed: each shard is a random subset
    shards = plan_shards(samples, shard_bytes, per_shard)
    outdir.mkdir(parents=True, exist_ok=True)
    partial = outdir / PARTIAL
    done: dict = {}
    settings = {"source": str(root.resolve()), "seed": seed, "shard_bytes": shard_bytes, "per_shard": per_shard,
                "labels": labels, "files": len(files)}
    if partial.is_file():
        try:
            prev = json.loads(partial.read_text())
        except json.JSONDecodeError:
            prev = {}
        if prev.get("settings") == settings:
            done = {s["name"]: s for s in prev.get("shards", [])}
            if done:
                log(f"resuming the pack: {len(done)} of {len(shards)} shard(s) already written")
        else:
            log(f"note: {partial} is of another pack (other source, seed or sizes); starting over")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), unit="img", desc="packing", dynamic_ncols=True)
    records, key = [], 0
    for i, shard in enumerate(shards):
        name = f"shard-{i:06d}.tar"
        if (name in done and (outdir / name).is_file() and (outdir / name).with_suffix(".idx").is_file()
                and (outdir / name).stat().st_size == done[name].get("bytes")):  # a truncated shard is written again
            rec = done[name]
        else:
            nbytes, _ = _write_shard(outdir / name, shard, key)
            rec = {"name": name, "index": name[:-4] + ".idx", "samples": len(shard), "bytes": nbytes,
                   "first_key": f"{key:09d}"}
            done[name] = rec
            atomic_write(partial, lambda f: f.write(json.dumps({"settings": settings,
                                                                "shards": list(done.values())}).encode()))
        records.append(rec)
        key += len(shard)
        if bar is not None:
            bar.update(len(shard))
    if bar is not None:
        bar.close()
    manifest = {
        "format": "webdataset", "shards": records, "samples": key, "bytes": sum(r["bytes"] for r in records),
        "classes": classes, "source": settings["source"], "seed": seed,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "left_out": [{"path": p, "why": w} for p, w in sorted(bad.items())],
        "shard_bytes": shard_bytes, "per_shard": per_shard,
    }
    atomic_write(outdir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    partial.unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class ShardSample:
    shard: int  # index into ShardSet.shards
    member: str  # the image member's name ({key}.{ext})
    offset: int
    size: int
    label: int | None
    label_at: tuple[int, int] | None = None
    """(offset, size) of the sample's {key}.cls member (packed with --labels), read when the label is asked for."""


class ShardSet:
    """The samples of a packed dataset, in manifest order, from the DALI index files (no tar scan). Every member an
    index names is checked to lie inside its tar (DALI reads past the end of a tar without a message, and crashes)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.shards = [root / s["name"] for s in manifest["shards"]]
        self.indices = [root / s["index"] for s in manifest["shards"]]
        self.samples: list[ShardSample] = []
        self.outside: list[str] = []
        """Index entries that point past the end of their tar (a truncated shard, or an index of another tar): the
        torchvision backend skips each with a warning when it meets it; DALI, which would crash, refuses the set."""
        for k, idx in enumerate(self.indices):
            self.samples += _read_index(idx, k, self.shards[k].stat().st_size, self.shards[k], self.outside)
        if len(self.samples) != manifest["samples"]:
            raise DataError(f"{root / MANIFEST} lists {manifest['samples']} samples but the index files hold "
                            f"{len(self.samples)}; pack again")

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> bytes:
        """The image bytes of sample i (one seek and one read in its shard)."""
        s = self.samples[i]
        path = self.shards[s.shard]
        with open(path, "rb") as f:
            f.seek(s.offset)
            data = f.read(s.size)
        if len(data) != s.size:
            raise DataError(f"shard {path} is truncated: member {s.member} (offset {s.offset}, {s.size} bytes) "
                            f"reads only {len(data)} bytes")
        return data

    def name(self, i: int) -> str:
        s = self.samples[i]
        return f"{self.shards[s.shard]}:{s.member}"

    @property
    def classes(self) -> list[str]:
        """The class names of a set packed with --labels (their index is the label), else []."""
        c = self.manifest.get("classes")
        return [str(x) for x in c] if isinstance(c, list) else []

    def label(self, i: int) -> int:
        """The class index of sample i, from its {key}.cls member (one small read)."""
        s = self.samples[i]
        if s.label_at is None:
            raise DataError(f"{self.name(i)} has no label ({{key}}.cls member): the set was packed without --labels")
        off, size = s.label_at
        with open(self.shards[s.shard], "rb") as f:
            f.seek(off)
            text = f.read(size)
        try:
            k = int(text.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"{self.name(i)}: its label member holds {text[:20]!r}, not a class index") from None
        if not 0 <= k < max(1, len(self.classes)):
            raise DataError(f"{self.name(i)}: label {k} is not one of the manifest's {len(self.classes)} classes")
        return k


def _read_index(path: Path, shard: int, tar_bytes: int | None = None, tar: Path | None = None,
                outside: list | None = None) -> list[ShardSample]:
    """The samples an index lists; entries past the end of the tar are appended to `outside` (or refused)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read the index {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a DALI webdataset index (not text)") from None
    if not lines or not lines[0].startswith("v1."):
        raise DataError(f"{path} is not a DALI webdataset index (first line {lines[0][:40] if lines else ''!r})")
    out = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split()
        if len(parts) % 4 or not parts:
            raise DataError(f"{path} line {n}: expected (ext offset size name) groups, got {line[:80]!r}")
        try:
            comps = {parts[j]: (int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]) for j in range(0, len(parts), 4)}
        except ValueError:
            raise DataError(f"{path} line {n}: offsets and sizes must be whole numbers, got {line[:80]!r}") from None
        for e, (off, size, member) in comps.items():
            if off < 512 or size < 0:
                raise DataError(f"{path} line {n}: member {member} has offset {off} and size {size}; a tar member's "
                                "data starts after its 512-byte header: the index is damaged, pack again")
            if tar_bytes is not None and off + size > tar_bytes:
                what = (f"{path} line {n}: member {member} (offset {off}, {size} bytes) lies outside "
                        f"{tar or 'its tar'} ({tar_bytes} bytes)")
                if outside is None:
                    raise DataError(f"{what}; the shard is truncated or the index is not its own: pack again")
                outside.append(what)
        img = next((e for e in comps if "." + e in IMAGE_EXTS), None)
        if img is None:
            raise DataError(f"{path} line {n}: no image component in {sorted(comps)}")
        off, size, member = comps[img]
        cls = comps.get("cls")
        out.append(ShardSample(shard, member, off, size, None, (cls[0], cls[1]) if cls else None))
    return out


def find_manifest(path: str | os.PathLike) -> Path | None:
    """The manifest of a packed dataset named by `path` (the directory or the manifest itself), else None."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".json"):
        return p
    if p.is_dir() and (p / MANIFEST).is_file():
        return p / MANIFEST
    return None


def check_manifest(manifest: dict, m: Path) -> None:
    """Every field a reader uses, with its type; shard and index names are files of the manifest's own directory
    (a manifest cannot make a run read files elsewhere)."""
    if isinstance(manifest.get("samples"), bool) or not isinstance(manifest.get("samples"), int):
        raise DataError(f"{m}: samples must be a whole number, got {manifest.get('samples')!r}")
    for i, s in enumerate(manifest["shards"]):
        if not isinstance(s, dict):
            raise DataError(f"{m}: shard {i} is {s!r}, not an entry with name and index")
        for key in ("name", "index"):
            v = s.get(key)
            if not isinstance(v, str) or not v:
                raise DataError(f"{m}: shard {i} has no {key} (got {v!r})")
            if os.path.basename(v) != v or v in (".", ".."):
                raise DataError(f"{m}: shard {i}'s {key} {v!r} is outside the manifest's directory {m.parent}; "
                                "a packed dataset's shards lie beside its manifest")


def open_shards(path: str | os.PathLike) -> ShardSet:
    m = find_manifest(path)
    if m is None:
        raise DataError(f"{path} is not a packed dataset (no {MANIFEST})")
    try:
        manifest = json.loads(m.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"cannot read {m}: {e}") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != "webdataset"
            or not isinstance(manifest.get("shards"), list) or not manifest["shards"]):
        raise DataError(f"{m} is not a manifest of `mae data pack` (a JSON object with format webdataset and a "
                        "list of shards)")
    check_manifest(manifest, m)
    missing = [s["name"] for s in manifest["shards"] if not (m.parent / s["name"]).is_file()]
    if missing:
        raise DataError(f"{m.parent}: {len(missing)} shard(s) of the manifest are missing: {', '.join(missing[:5])}")
    return ShardSet(m.parent, manifest)
