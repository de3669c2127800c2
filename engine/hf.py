"""Hugging Face `ViTMAEForPreTraining` weights in and out (the `facebook/vit-mae-*` layout).

A Hugging Face directory is `config.json` (model_type vit_mae) + `model.safetensors`, as `save_pretrained` writes
it. Import reads the key layouts transformers has used: the one of the released `facebook/vit-mae-*` checkpoints
(`vit.encoder.layer.N.attention.attention.query`, ...) and transformers 5's (`vit.layers.N.attention.q_proj`, ...,
and the `decoder.decoder_encoder.layer.N` its save_pretrained writes);
export writes the released layout, which every transformers version loads. The maths is the same model: separate
q / k / v projections are this model's fused qkv split in three; the same sin-cos position embeddings, mask token,
norm-pix loss, and the same masks for the same noise (an argsort of the noise, keeping the first K).

Only safetensors are read (no pickle: nothing in an imported directory can run code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .atomic import CheckpointError, atomic_write
from .config import ModelConfig

HF_LAYER = {  # ours (within a block) -> the released layout's names (within a layer)
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
HF5_LAYER = {  # transformers 5 layout -> the released layout
    "attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
TOP = {  # ours -> the released layout, outside the blocks
    "cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight", "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight", "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight", "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        c = json.loads((p / "config.json").read_text())
    except (ValueError, OSError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return isinstance(c, dict) and c.get("model_type") == "vit_mae"


def hf_config(m: ModelConfig) -> dict:
    """The ViTMAEConfig (as config.json) of a model config."""
    if m.encoder_mask_tokens:
        raise CheckpointError("the dense baseline (model.encoder_mask_tokens) has no Hugging Face ViTMAE form")
    return {
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
        "hidden_size": m.embed_dim, "num_hidden_layers": m.depth, "num_attention_heads": m.num_heads,
        "intermediate_size": int(m.embed_dim * m.mlp_ratio), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
        "image_size": m.img_size, "patch_size": m.patch_size, "num_channels": m.in_chans, "qkv_bias": True,
        "decoder_num_attention_heads": m.decoder_num_heads, "decoder_hidden_size": m.decoder_embed_dim,
        "decoder_num_hidden_layers": m.decoder_depth,
        "decoder_intermediate_size": int(m.decoder_embed_dim * m.mlp_ratio),
        "mask_ratio": m.mask_ratio, "norm_pix_loss": m.norm_pix_loss,
    }


def model_config_from_hf(c: dict, path="config.json") -> ModelConfig:
    """Our ModelConfig of a ViTMAEConfig dict; refuses settings this model cannot reproduce, and values of the wrong
    type or out of range (named with the field)."""
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: holds a {type(c).__name__}, not a Hugging Face config (a JSON object)")
    for key in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads", "intermediate_size",
                "decoder_intermediate_size"):
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise CheckpointError(f"{path}: {key} must be an integer, got {v!r} ({type(v).__name__})")
    for key in ("mask_ratio", "layer_norm_eps"):
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CheckpointError(f"{path}: {key} must be a number, got {v!r} ({type(v).__name__})")
    if c.get("hidden_size", 768) <= 0 or c.get("decoder_hidden_size", 512) <= 0:
        raise CheckpointError(f"{path}: hidden_size and decoder_hidden_size must be positive")
    problems = []
    if c.get("hidden_act", "gelu") not in ("gelu",):
        problems.append(f"hidden_act {c.get('hidden_act')!r} (this model uses exact GELU)")
    if not c.get("qkv_bias", True):
        problems.append("qkv_bias false")
    if abs(float(c.get("layer_norm_eps", 1e-12)) - 1e-6) > 1e-12:
        problems.append(f"layer_norm_eps {c.get('layer_norm_eps')} (this model uses 1e-6, as the paper)")
    mlp = c.get("intermediate_size", 4 * c.get("hidden_size", 768)) / c.get("hidden_size", 768)
    dmlp = c.get("decoder_intermediate_size", 2048) / c.get("decoder_hidden_size", 512)
    if abs(mlp - dmlp) > 1e-9:
        problems.append(f"encoder / decoder MLP ratios {mlp:g} / {dmlp:g} differ")
    if problems:
        raise CheckpointError(f"{path}: this Hugging Face ViTMAE cannot be represented here: {'; '.join(problems)}")
    try:
        return ModelConfig(img_size=int(c.get("image_size", 224)), patch_size=int(c.get("patch_size", 16)),
                           in_chans=int(c.get("num_channels", 3)), embed_dim=int(c.get("hidden_size", 768)),
                           depth=int(c.get("num_hidden_layers", 12)), num_heads=int(c.get("num_attention_heads", 12)),
                           decoder_embed_dim=int(c.get("decoder_hidden_size", 512)),
                           decoder_depth=int(c.get("decoder_num_hidden_layers", 8)),
                           decoder_num_heads=int(c.get("decoder_num_attention_heads", 16)), mlp_ratio=mlp,
                           norm_pix_loss=bool(c.get("norm_pix_loss", False)),
                           mask_ratio=float(c.get("mask_ratio", 0.75)))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def to_hf_state(sd: dict) -> dict:
    """Our state dict -> the released Hugging Face layout (qkv split into query / key / value)."""
    out = {}
    for k, v in sd.items():
        if k in TOP:
            out[TOP[k]] = v
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            raise CheckpointError(f"parameter {k} has no place in a Hugging Face ViTMAE")
        where, i, name, leaf = m.groups()
        prefix = f"vit.encoder.layer.{i}." if where == "blocks" else f"decoder.decoder_layers.{i}."
        if name == "attn.qkv":
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{part}.{leaf}"] = t.contiguous()
        elif name in HF_LAYER:
            out[f"{prefix}{HF_LAYER[name]}.{leaf}"] = v
        else:
            raise CheckpointError(f"parameter {k} has no place in a Hugging Face ViTMAE")
    return out


def from_hf_state(hf: dict, path="model.safetensors") -> dict:
    """A Hugging Face ViTMAEForPreTraining state dict (either layout) -> ours (query / key / value fused)."""
    released = {}
    for k, v in hf.items():
        # transformers 5 names the layers vit.layers / decoder.decoder_layers in memory and (5.24) writes the
        # decoder's as decoder.decoder_encoder.layer: all three spellings are the same tensors
        k2 = k.replace("vit.layers.", "vit.encoder.layer.").replace("decoder.decoder_encoder.layer.",
                                                                     "decoder.decoder_layers.")
        for new, old in HF5_LAYER.items():
            k2 = k2.replace(f".{new}.", f".{old}.")
        released[k2] = v
    inv_top = {v: k for k, v in TOP.items()}
    inv_layer = {v: k for k, v in HF_LAYER.items()}
    out, qkv = {}, {}
    for k, v in released.items():
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        m = re.match(r"^(vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            raise CheckpointError(f"{path}: {k} is not a parameter of ViTMAEForPreTraining")
        where, i, name, leaf = m.groups()
        ours = f"{'blocks' if where == 'vit.encoder.layer' else 'decoder_blocks'}.{i}"
        q = re.match(r"^attention\.attention\.(query|key|value)$", name)
        if q:
            qkv.setdefault((ours, leaf), {})[q.group(1)] = v
        elif name in inv_layer:
            out[f"{ours}.{inv_layer[name]}.{leaf}"] = v
        else:
            raise CheckpointError(f"{path}: {k} is not a parameter of ViTMAEForPreTraining")
    for (ours, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{path}: {ours} lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[f"{ours}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def export_hf(sd: dict, m: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/config.json` and `out_dir/model.safetensors` (loadable with
    ViTMAEForPreTraining.from_pretrained(out_dir)). Each file is written atomically."""
    from safetensors.torch import save

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hf_state(sd).items()}
    atomic_write(out / "model.safetensors", lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(out / "config.json", lambda f: f.write(json.dumps(hf_config(m), indent=2).encode() + b"\n"))
    return out


def import_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(model config, our state dict) of a Hugging Face ViTMAE directory."""
    from safetensors.torch import load_file

    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {p / 'config.json'}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"cannot read {p / 'config.json'}: nested too deeply to be a model config") from None
    files = sorted(p.glob("*.safetensors"))
    if not files:
        extra = " (only pickled weights, which are not loaded: they could run code)" if list(p.glob("*.bin")) else ""
        raise CheckpointError(f"{p} holds no .safetensors weights{extra}; save them with save_pretrained "
                              "(safe_serialization, the default)")
    model_config_from_hf(cfg, p / "config.json")  # refused before any weights are read
    hf = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return model_config_from_hf(cfg, p / "config.json"), from_hf_state(hf, files[0])
