"""Which LayerNorm kernels the model uses (`train.layer_norm`): torch's, or NVIDIA apex's fused LayerNorm
(`apex.normalization.FusedLayerNorm`) when apex is installed.

apex is optional and not on the package index (it is built from source against the local CUDA toolkit). Its
LayerNorm is a C++/CUDA extension: eager blocks only (torch.compile already fuses LayerNorm with the residual
and cannot trace the extension), one process (FSDP2 shards parameters into DTensors the extension does not
take), CUDA only. The swap happens after the parameters have their values: the modules are replaced, the
Parameter objects and their names are kept, so checkpoints, the optimizer and the initialisation are unchanged.
"""

from __future__ import annotations

from torch import nn

LAYER_NORMS = ("torch", "apex")


def apex_fused_layer_norm():
    """apex.normalization.FusedLayerNorm when apex is importable, else None."""
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore
    except Exception:  # noqa: BLE001 - a broken apex build raises anything from its extension loader
        return None
    return FusedLayerNorm


def apply_layer_norm(model: nn.Module, impl: str) -> int:
    """Replace every nn.LayerNorm of `model` by apex's FusedLayerNorm sharing its Parameters (impl="apex");
    returns how many were replaced. impl="torch" leaves the model as built."""
    if impl not in LAYER_NORMS:
        raise ValueError(f"layer_norm must be one of {LAYER_NORMS}, got {impl!r}")
    if impl == "torch":
        return 0
    fused_cls = apex_fused_layer_norm()
    if fused_cls is None:
        raise RuntimeError("train.layer_norm=apex but apex is not importable (NVIDIA apex is built from source "
                           "with its CUDA extensions); use --train.layer_norm torch")
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.LayerNorm) and not isinstance(child, fused_cls)]
    for parent, name, ln in swaps:
        fused = fused_cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine)
        if ln.elementwise_affine:
            fused.weight = ln.weight  # the same Parameter objects: optimizer state and names carry over
            fused.bias = ln.bias
        setattr(parent, name, fused)
    return len(swaps)
