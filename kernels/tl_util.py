"""What the Triton kernels share: whether Triton is importable, and the cast to an output dtype.

`cast` rounds to nearest-even as CUDA's conversion does. Triton's CPU interpreter (TRITON_INTERPRET=1, which
the tests use) truncates fp32 -> bf16 instead, so there the rounding is written out in integer arithmetic; on a
GPU the native conversion runs. Kernels pass EXACT_BF16=INTERPRETING.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - torch without triton (e.g. some CPU wheels)
    HAS_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when the kernels are decorated


def pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def cast(v, dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
        """v.to(dtype), rounding fp32 -> bf16 to nearest-even also under the interpreter."""
        if EXACT_BF16 and dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return v.to(dtype)
