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
