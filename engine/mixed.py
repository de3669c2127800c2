"""bf16 compute with fp32 master weights, without autocast (`train.precision=bf16-pure`).

The module keeps its fp32 parameters: they are the master weights the optimizer updates and what checkpoints
hold, so nothing downstream changes. Each step, one multi-tensor copy refreshes bf16 copies of them, the
forward runs on those copies through `torch.func.functional_call` (activations, the residual stream included,
stay bf16; LayerNorm and softmax accumulate in fp32 inside their kernels; the loss accumulates in fp32), and
after each backward one multi-tensor copy moves the bf16 gradients into fp32 gradient buffers of the masters.

Against bf16 autocast this removes the per-op casts of activations (autocast runs LayerNorm in fp32, so every
linear re-casts its input and every residual add widens), halves the residual stream's bytes and saved
activations, and replaces hundreds of per-weight casts by one launch. The cost: 2 bytes per parameter for the
copies (their bf16 gradients live during backward instead of autocast's fp32 ones; the fp32 gradients are
made after backward). Numerically it is the FSDP2 MixedPrecisionPolicy(param_dtype=bf16) recipe with a bf16 residual stream;
`mae bench agreement` holds its loss curve to the autocast reference's.
"""

from __future__ import annotations

import torch


class Bf16Compute:
    """Callable like the model: compute(imgs, mask_ratio, noise) -> the model's outputs, computed in `dtype`.

    refresh(): copy the masters into the bf16 copies (once per optimizer step, before the first forward).
    collect(first): move the copies' gradients into the masters' fp32 .grad (fresh tensors on the first
    micro-batch of a step, added to on the others) and clear the copies' gradients.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.model = model
        self.dtype = dtype
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.masters = [p for _, p in named]
        self.copies = [p.detach().to(dtype).requires_grad_(p.requires_grad) for p in self.masters]
        self.train_idx = [i for i, p in enumerate(self.masters) if p.requires_grad]

    def refresh(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.masters)

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, dict(zip(self.names, self.copies)), args, kwargs,
                                          tie_weights=False, strict=True)

    def collect(self, first: bool) -> None:
        """The fp32 gradients are allocated here, after backward has freed the activations, and released by the
        optimizer's zero_grad(set_to_none=True): they are not part of the step's peak (backward's)."""
        idx = [i for i in self.train_idx if self.copies[i].grad is not None]
        if not idx:
            return
        fresh = [i for i in idx if first or self.masters[i].grad is None]
        add = [i for i in idx if not (first or self.masters[i].grad is None)]
        with torch.no_grad():
            if fresh:
                bufs = [torch.empty_like(self.masters[i]) for i in fresh]
                torch._foreach_copy_(bufs, [self.copies[i].grad for i in fresh])
                for i, b in zip(fresh, bufs):
                    self.masters[i].grad = b
            if add:
                torch._foreach_add_([self.masters[i].grad for i in add], [self.copies[i].grad for i in add])
        for i in idx:
            self.copies[i].grad = None


class LossScaler:
    """Dynamic loss scaling for fp16 autocast (`train.precision=fp16`, for GPUs without bf16: V100, T4), on the
    device: no host sync. The loss is multiplied by `scale` before backward; `unscale(grads)` divides the gradients
    back and returns 1.0 when any of them is inf / NaN (an overflow: the step skips its update); `update(bad)` halves
    the scale after a bad step and doubles it after `growth_interval` good ones in a row (torch's GradScaler rule,
    through the same kernels, with the skip decided by the step's own flag, all-reduced over ranks)."""

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.overflows = torch.zeros((), dtype=torch.int64, device=device)
        """Steps skipped for an overflow so far (device counter; in the checkpoint)."""

    def unscale(self, grads: list[torch.Tensor]) -> torch.Tensor:
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        by_dtype: dict = {}
        for g in local:
            by_dtype.setdefault((g.device, g.dtype), []).append(g)
        inv = self.scale.double().reciprocal().float()
        for (dev, _), gs in by_dtype.items():
            torch._amp_foreach_non_finite_check_and_unscale_(gs, found_inf, inv.to(dev))
        return found_inf

    def update(self, bad: torch.Tensor) -> None:
        self.overflows += (bad > 0).to(torch.int64)
        torch._amp_update_scale_(self.scale, self.growth_tracker, bad.to(torch.float32), self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker),
                "overflows": int(self.overflows)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.growth_tracker.fill_(int(state["growth_tracker"]))
        self.overflows.fill_(int(state.get("overflows", 0)))
