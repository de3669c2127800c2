"""The whole training step (forward, backward and optimizer over the micro-batches) captured once in a CUDA
graph and replayed, for single-process training (`train.cuda_graph`).

A step has static shapes for a given batch and mask ratio, so it can be recorded: the inputs are copied into
static buffers, the graph replays every kernel of forward, backward and the fused AdamW update without the
host launching them one by one, and the loss and finite flag come back in static outputs. One graph is kept
per (batch shape, mask ratio, micro-batches), so sweeping the mask ratio re-captures once per ratio and
switching back costs nothing.

What is recorded is `TrainStep.body` (engine/step.py), the body every other path runs: no second copy of the
step lives here. What stays outside the graph: drawing the mask noise (so the masks are the same numbers as in
the eager path), copying the batch in, setting the learning rate (a device tensor the graph reads).

The same body runs eagerly when `capture=False` (on any device): that is the reference the graph is held
to, and what the CPU tests run. Warm-up iterations before capture run with the update forced off (the fused
optimizer's `found_inf`), so capturing leaves parameters and optimizer state exactly as they were.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .optim import supports_found_inf


def tensor_lr_(opt: torch.optim.Optimizer) -> None:
    """Make every param group's lr a 0-d tensor on the parameters' device (read by the graph at replay).

    fp32 on CUDA, where the fused kernel computes in fp32 anyway; fp64 on CPU, where a float lr is used as a
    double, so the two forms give the same update."""
    for g in opt.param_groups:
        if not isinstance(g["lr"], torch.Tensor):
            dev = g["params"][0].device if g["params"] else torch.device("cpu")
            dt = torch.float64 if dev.type == "cpu" else torch.float32
            g["lr"] = torch.tensor(float(g["lr"]), dtype=dt, device=dev)


class CudaCapture:
    """What a capture needs from CUDA: a side stream for the warm-up, then record `fn` into a graph. The CPU tests
    put a stand-in here that records `fn` without running it and runs it at replay, which holds the capture
    protocol (warm-up with the update off, static buffers, one capture per shape and ratio, the skip flag) without
    a GPU."""

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def warm_up(self, device: torch.device, fn) -> None:
        """Run fn on a side stream (lazy state and first calls of compiled code), then wait for it."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def settle(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up's activations are cached for the side stream: free them first

    def record(self, fn):
        """A graph of fn's kernels (fn's Python runs once, nothing is executed); .replay() runs them."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g


@dataclass
class _Captured:
    imgs: list[torch.Tensor]
    noise: list[torch.Tensor]
    skip: torch.Tensor
    loss: torch.Tensor
    finite: torch.Tensor
    grad_norm: torch.Tensor
    mask_ratio: float
    graph: object = None


class GraphedStep:
    """step(micro_batches[, mask_ratio]) -> (mean loss, finite flag), 0-d device tensors valid until the next
    call; micro_batches: a list of (imgs, noise) pairs. Each (shapes, mask ratio) gets its own static buffers (and
    graph): a sweep that comes back to a ratio replays what it captured before.

    step: the engine.step.TrainStep to record (its optimizer must skip on the device through `found_inf`:
    torch's fused AdamW; its lr becomes a tensor); its autocast weight cache is off here (cached casts do not
    survive capture) and its hooks are not called (nothing is timed or counted inside a replay).
    capture: record a CUDA graph (needs CUDA); False runs the same body eagerly.
    max_graphs: graphs kept at once (each holds its own activation memory); the oldest is dropped.
    backend: what records and replays (CudaCapture; the tests' stand-in off CUDA).
    """

    def __init__(self, step, mask_ratio: float, capture: bool = True, warmup: int = 2, max_graphs: int = 2,
                 backend: CudaCapture | None = None):
        self.backend = backend or CudaCapture()
        optimizer = step.optimizer
        if not supports_found_inf(optimizer):
            raise ValueError("a graphed step needs an optimizer that skips on the device (torch fused AdamW); "
                             f"got {type(optimizer).__name__}")
        self.plain, self.optimizer = step, optimizer  # the TrainStep recorded
        self.mask_ratio = mask_ratio
        self.capture = capture
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.grad_norm = torch.zeros(())  # the last step's gradient norm (a static output, valid until the next)
        self.captures = 0
        self.builds = 0  # static-buffer sets made (one per shapes and ratio); captures counts the CUDA graphs
        tensor_lr_(optimizer)
        if capture:  # torch refuses to capture step() otherwise; the fused kernel reads lr and step on device
            for g in optimizer.param_groups:
                g["capturable"] = True
            optimizer._warned_capturable_if_run_uncaptured = True  # the warm-up runs uncaptured on purpose

    @property
    def model(self):
        return self.plain.model

    def _body(self, c: _Captured) -> None:
        loss, bad = self.plain.body(list(zip(c.imgs, c.noise)), c.mask_ratio, skip=c.skip, autocast_cache=False)
        c.loss.copy_(loss)
        c.finite.copy_(bad == 0)
        c.grad_norm.copy_(self.plain.grad_norm)

    def _new(self, micro_batches, mask_ratio: float) -> _Captured:
        imgs_list, noise_list = [x for x, _ in micro_batches], [n for _, n in micro_batches]
        dev = imgs_list[0].device
        c = _Captured(imgs=[torch.empty_like(x) for x in imgs_list], noise=[torch.empty_like(n) for n in noise_list],
                      skip=torch.zeros((), dtype=torch.bool, device=dev),
                      loss=torch.zeros((), dtype=torch.float32, device=dev),
                      finite=torch.ones((), dtype=torch.bool, device=dev),
                      grad_norm=torch.zeros((), dtype=torch.float32, device=dev), mask_ratio=mask_ratio)
        for s, x in zip(c.imgs + c.noise, imgs_list + noise_list):
            s.copy_(x)
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        if not self.capture:
            return c
        if not self.backend.available(dev):
            raise RuntimeError("a CUDA graph needs CUDA tensors; use capture=False elsewhere")
        # warm up (lazy optimizer state, Triton/cuBLAS/compile first calls) with the update forced off
        c.skip.fill_(True)

        def warm():
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._body(c)

        self.backend.warm_up(dev, warm)
        self.optimizer.zero_grad(set_to_none=True)
        self.backend.settle(dev)
        def recorded():  # a capture starts from released gradients: backward writes them, nothing accumulates
            self.optimizer.zero_grad(set_to_none=True)
            self._body(c)

        g = self.backend.record(recorded)  # records only: nothing runs, so no update happens here
        c.graph = g
        c.skip.fill_(False)
        self.captures += 1
        return c

    def __call__(self, micro_batches, mask_ratio: float | None = None):
        micro_batches = list(micro_batches)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        key = (tuple((tuple(x.shape), x.dtype) for x, _ in micro_batches), tuple(n.shape for _, n in micro_batches),
               ratio)
        c = self.graphs.get(key)
        if c is None:
            c = self._new(micro_batches, ratio)
            self.graphs[key] = c
            self.builds += 1
        else:
            self.graphs.move_to_end(key)
            for s, x in zip(c.imgs + c.noise, [x for x, _ in micro_batches] + [n for _, n in micro_batches]):
                s.copy_(x, non_blocking=True)
        if c.graph is not None:
            c.graph.replay()
        else:  # the eager reference of the same body
            self._body(c)
            self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = c.grad_norm
        return c.loss, c.finite

    def reset(self) -> None:
        """Drop every capture (after the parameters or optimizer state were replaced, e.g. by a rollback)."""
        self.graphs.clear()
