"""Mask sampling strategies of the paper's Figure 6, each expressed as per-sample noise [N, L]: the
masking kernels keep the K patches with the smallest noise, so one gather/unshuffle serves all three.

- random: uniform noise (the paper's default).
- block: BEiT-style block-wise masking; the masked blocks get noise in [1, 2), the rest [0, 1).
- grid: regular grid sampling (mask 0.75 keeps one patch of every 2x2 cell); lattice points get noise in
  [0, 1), the rest [1, 2); the lattice offset is random per sample.
"""

from __future__ import annotations

import math

import torch

STRATEGIES = ("random", "block", "grid")


def random_noise(n: int, grid: int, mask_ratio: float, generator=None, device=None) -> torch.Tensor:
    return torch.rand(n, grid * grid, generator=generator, device=device)


def block_mask(grid: int, num_masked: int, generator: torch.Generator, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 1000) -> torch.Tensor:
    """BEiT's block-wise masking on a grid x grid map: rectangles of random area and aspect until
    `num_masked` patches are covered (or no rectangle fits). Returns a bool [grid, grid] map."""
    m = torch.zeros(grid, grid, dtype=torch.bool)
    count, tries = 0, 0
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while count < num_masked and tries < max_tries:
        tries += 1
        left_to_mask = num_masked - count
        area = min_block + float(torch.rand((), generator=generator)) * max(0, left_to_mask - min_block)
        ar = math.exp(log_lo + float(torch.rand((), generator=generator)) * (log_hi - log_lo))
        h = int(round(math.sqrt(area * ar)))
        w = int(round(math.sqrt(area / ar)))
        if not (0 < h <= grid and 0 < w <= grid):
            continue
        top = int(torch.randint(0, grid - h + 1, (), generator=generator))
        left = int(torch.randint(0, grid - w + 1, (), generator=generator))
        patch = m[top:top + h, left:left + w]
        new = int((~patch).sum())
        if 0 < new <= left_to_mask + min_block:  # BEiT allows a small overshoot
            patch[:] = True
            count += new
    return m


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    """Block sampling is sequential host work: a CPU generator seeded from `generator` (one host sync per
    call when that one lives on a GPU; only this ablation strategy pays it)."""
    if generator is not None and generator.device.type == "cpu":
        return generator
    dev = generator.device if generator is not None else None
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator, device=dev)))


def block_noise(n: int, grid: int, mask_ratio: float, generator=None, device=None) -> torch.Tensor:
    g = _cpu_generator(generator)
    num_masked = grid * grid - int(grid * grid * (1 - mask_ratio))
    maps = torch.stack([block_mask(grid, num_masked, g).flatten() for _ in range(n)]).float()
    return (maps + torch.rand(n, grid * grid, generator=g)).to(device)


def grid_noise(n: int, grid: int, mask_ratio: float, generator=None, device=None) -> torch.Tensor:
    keep = max(1, int(grid * grid * (1 - mask_ratio)))
    stride = max(1, int(round(math.sqrt(grid * grid / keep))))
    u = torch.rand(n, grid * grid, generator=generator, device=device)
    off = torch.randint(0, stride, (n, 2), generator=generator, device=device)
    idx = torch.arange(grid, device=device)
    on_h = ((idx[None, :] - off[:, :1]) % stride == 0)  # [n, grid]
    on_w = ((idx[None, :] - off[:, 1:]) % stride == 0)
    lattice = (on_h[:, :, None] & on_w[:, None, :]).reshape(n, grid * grid)
    return u + (~lattice).float()


GENERATORS = {"random": random_noise, "block": block_noise, "grid": grid_noise}


def make_noise(strategy: str, n: int, grid: int, mask_ratio: float, generator=None, device=None) -> torch.Tensor:
    """Noise [n, grid*grid] for `strategy`; keep-the-smallest masking turns it into that strategy's mask."""
    if strategy not in GENERATORS:
        raise ValueError(f"mask strategy must be one of {STRATEGIES}, got {strategy!r}")
    return GENERATORS[strategy](n, grid, mask_ratio, generator, device)
