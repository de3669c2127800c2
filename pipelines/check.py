"""`mae data check DIR`: find the files a training run would trip on, before it does.

Quarantined (excluded by both backends through the quarantine list): zero-byte files, non-images (an
image extension on something else, or an unknown format), files that cannot be decoded (truncated or
corrupt), images over the pixel limit, CMYK JPEGs, and files whose content is another format than their
name says (a PNG named .jpg: GPU JPEG decoders reject it). Noted only: grayscale images and PNGs, which
both backends decode (to RGB; PNGs on the CPU in DALI); `--strict` quarantines them too.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .common import IMAGE_EXTS, QUARANTINE_NAME, DataError, walk_files

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold

MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
         (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF",
              ".tiff": "TIFF"}


@dataclass
class Finding:
    path: str
    kind: str
    """zero_bytes | not_image | corrupt | huge | cmyk | format_mismatch | grayscale | png | ok"""
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.kind in ("zero_bytes", "not_image", "corrupt", "huge", "cmyk", "format_mismatch")


def sniff(head: bytes) -> str | None:
    for magic, fmt in MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_file(path: str, max_pixels: int = MAX_PIXELS, decode: bool = True) -> Finding:
    from PIL import Image

    try:
        size = os.path.getsize(path)
        if size == 0:
            return Finding(path, "zero_bytes", "0 bytes")
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return Finding(path, "corrupt", f"unreadable: {e.strerror or e}")
    fmt = sniff(head)
    if fmt is None:
        return Finding(path, "not_image", f"not an image (starts with {head[:8]!r})")
    ext = os.path.splitext(path)[1].lower()
    if EXT_FORMAT.get(ext) not in (None, fmt):
        return Finding(path, "format_mismatch", f"{fmt} content named {ext}")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                return Finding(path, "huge", f"{w}x{h} = {w * h / 1e6:.1f} MP > limit {max_pixels / 1e6:.1f} MP")
            mode = im.mode
            if fmt == "JPEG" and mode == "CMYK":
                return Finding(path, "cmyk", "CMYK JPEG")
            if decode:
                im.load()  # a full decode: truncation shows up here
    except Image.DecompressionBombError as e:
        return Finding(path, "huge", str(e).split(".")[0])
    except Exception as e:  # noqa: BLE001 - any decoder failure is a finding
        return Finding(path, "corrupt", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Finding(path, "grayscale", f"mode {mode}: {16 if mode.startswith('I;16') else 32}-bit greyscale (the "
                                          "torchvision backend scales it to 8 bits; --strict quarantines it)")
    if mode in ("L", "LA", "1"):
        return Finding(path, "grayscale", f"mode {mode} (decoded as RGB)")
    if fmt == "PNG":
        return Finding(path, "png", "PNG (CPU decode in DALI)")
    return Finding(path, "ok")


def _check_many(args):
    paths, max_pixels, decode = args
    return [check_file(p, max_pixels, decode) for p in paths]


def scan(root: str, workers: int = 0, max_pixels: int = MAX_PIXELS, decode: bool = True) -> list[Finding]:
    """Check every file under `root` (not only image extensions: a non-image is a finding too)."""
    if not os.path.isdir(root):
        raise DataError(f"data directory {root} does not exist" if not os.path.exists(root) else
                        f"data path {root} is not a directory")
    paths = walk_files(root)
    if not paths:
        raise DataError(f"no files found in {root}")
    findings: list[Finding] = []
    non_images = [p for p in paths if not p.lower().endswith(IMAGE_EXTS)]
    findings += [Finding(p, "not_image", "not an image extension (ignored by the loaders)") for p in non_images]
    images = [p for p in paths if p.lower().endswith(IMAGE_EXTS)]
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [images[i:i + 256] for i in range(0, len(images), 256)]
    if workers > 1 and len(images) > 512:
        with ProcessPoolExecutor(workers) as ex:
            for part in ex.map(_check_many, [(c, max_pixels, decode) for c in chunks]):
                findings += part
    else:
        for c in chunks:
            findings += _check_many((c, max_pixels, decode))
    return findings


def write_quarantine(findings: list[Finding], path: str, strict: bool = False) -> int:
    """Atomically write one JSON line {"path", "why"} per quarantined file (names with tabs or newlines hold);
    returns how many."""
    import tempfile

    bad = [f for f in findings if (f.bad or (strict and f.kind in ("grayscale", "png")))
           and f.path.lower().endswith(IMAGE_EXTS)]
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".quarantine.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# written by `mae data check`; both data backends skip these files (one JSON object a line)\n")
            for x in bad:
                f.write(json.dumps({"path": x.path, "why": f"{x.kind}: {x.detail}"}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(bad)


def default_quarantine_path(root: str) -> str:
    return os.path.join(root, QUARANTINE_NAME)
