"""`mae pretrain --dry-run`: ViT-H/14 rehearsed at world 64 as FSDP2 and as HSDP 8x8 on the CPU (fake process group,
one step on fake tensors). The counted collectives equal what the sharding implies: all-gathers move every parameter
(FSDP2's dim-0 padding included) in bf16 twice a step (forward, and again in backward after the reshard),
reduce-scatters every trainable gradient once in fp32, HSDP's all-reduce each gradient shard across the replicas;
each rank's shards are 1/shard of the model; every gradient comes back the shape of its shard. A fake group moves no
data, so losses are not compared."""

from __future__ import annotations

import pytest
import torch

from engine.cli import main
from engine.config import ConfigError, apply_overrides, get_preset
from engine.dryrun import rehearse


def _padded(cfg, shard: int, trainable_only: bool = False) -> int:
    """Elements of the model with every parameter's first dimension padded to a multiple of `shard` (FSDP2)."""
    from engine.model import build_model

    with torch.device("meta"):
        m = build_model(cfg.model)
    return sum(-(-p.shape[0] // shard) * shard * (p.numel() // p.shape[0]) for p in m.parameters()
               if p.requires_grad or not trainable_only)


@pytest.fixture(scope="module")
def vit_h():
    return apply_overrides(get_preset("vit-h"), {"train.batch_size": "2"})


def test_fsdp2_at_world_64_counts_the_bytes_the_sharding_implies(vit_h):
    plan = rehearse(vit_h, 64, rank=5, estimate_memory=False)
    c = plan.collectives
    units = vit_h.model.depth + vit_h.model.decoder_depth + 1  # every block, then the root
    assert c.calls == {"all_gather@shard": 2 * units, "reduce_scatter@shard": units, "all_reduce@shard": 2}
    # (on a 1-D mesh the shard group is the world; the two scalar all-reduces: the gradient norm and the skip flag)
    assert c.bytes["all_gather@shard"] == 2 * _padded(vit_h, 64) * 2  # bf16, forward and backward
    assert c.bytes["reduce_scatter@shard"] == _padded(vit_h, 64, trainable_only=True) * 4  # fp32 reduction
    # the 64 shards add up to the model, and this rank holds what the chunk rule gives it (fp32 masters)
    assert sum(plan.shard_elements) == plan.params_total == 657_074_508
    assert plan.local_elements == plan.shard_elements[5] and plan.param_bytes == 4 * plan.local_elements
    assert plan.shard_shapes_ok and plan.global_batch == 128 and plan.param_dtype == "bfloat16"


def test_hsdp_8x8_reduces_within_the_shard_group_and_all_reduces_across_replicas():
    cfg = apply_overrides(get_preset("debug"), {"train.batch_size": "2", "parallel.replicate": "8"})  # any model:
    plan = rehearse(cfg, 64, rank=0, estimate_memory=False)  # the rule is per unit (ViT-H's world 64 is held above)
    c = plan.collectives
    units = cfg.model.depth + cfg.model.decoder_depth + 1
    assert c.calls["all_gather@shard"] == 2 * units and c.calls["reduce_scatter@shard"] == units
    assert c.bytes["all_gather@shard"] == 2 * _padded(cfg, 8) * 2
    assert c.bytes["reduce_scatter@shard"] == _padded(cfg, 8, trainable_only=True) * 4
    # each unit's reduced gradient shard, summed over the 8 replicas
    assert c.calls["all_reduce@replicate"] == units
    assert c.bytes["all_reduce@replicate"] == _padded(cfg, 8, trainable_only=True) * 4 // 8
    assert sum(plan.shard_elements) == plan.params_total and len(plan.shard_elements) == 8
    assert plan.local_elements == plan.shard_elements[0] and plan.shard_shapes_ok


def test_the_command_prints_the_plan_and_refuses_what_a_launch_would(tmp_path, capsys):
    base = ["pretrain", "--preset", "debug", "--dry-run", "--run-dir", str(tmp_path / "r")]
    assert main([*base, "--world-size", "4", "--parallel.replicate", "2", "--train.batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "HSDP 2 replicas x 2 shards" in out and "global 16" in out and "all_reduce@replicate" in out, out
    assert "peak memory per GPU (estimate)" in out and "fits" in out
    assert not (tmp_path / "r").exists()  # a rehearsal writes nothing
    assert main([*base, "--world-size", "6", "--parallel.replicate", "4"]) == 2
    assert "does not divide the world size 6" in capsys.readouterr().err
    assert main([*base, "--world-size", "4", "--rank", "4"]) == 2
    assert "--rank must be in [0, 3]" in capsys.readouterr().err
    assert main([*base, "--world-size", "2", "--train.batch_size", "4096", "--gpu-memory-gib", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "over the GPU's 0.5 GiB" in err and len(err.splitlines()) == 1, err


def test_a_rehearsal_leaves_no_process_group_behind(vit_h):
    import torch.distributed as dist

    cfg = apply_overrides(get_preset("debug"), {"train.batch_size": "2"})
    rehearse(cfg, 16, estimate_memory=False)
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="already rehearsed rank 0 of a 16-rank job.*in a new process"):
        rehearse(cfg, 16, rank=3, estimate_memory=False)
    with pytest.raises(ConfigError, match="replicate=3 does not divide"):
        rehearse(apply_overrides(cfg, {"parallel.replicate": "3"}), 16)


def test_the_fp8_lever_gathers_the_encoder_linears_in_float8():  # world 32: this process rehearsed rank 5 of 64
    """train.precision fp8 (tensorwise): FSDP2 all-gathers the converted encoder linears' weights in float8, one byte
    an element instead of bf16's two; everything else as in bf16. (Needs torchao, as the fp8 lever does.)"""
    pytest.importorskip("torchao")
    from engine.model import build_model

    cfg = apply_overrides(get_preset("debug"), {"train.batch_size": "1"})  # ViT-H's count is the same rule
    bf16 = rehearse(cfg, 32, estimate_memory=False).collectives
    fp8 = rehearse(apply_overrides(cfg, {"train.precision": "fp8"}), 32, estimate_memory=False).collectives
    with torch.device("meta"):
        m = build_model(cfg.model)
    linears = sum(-(-w.shape[0] // 32) * 32 * w.shape[1] for blk in m.blocks for name, w in blk.named_parameters()
                  if name.endswith("weight") and w.dim() == 2)  # qkv, proj, fc1, fc2 of every encoder block
    assert bf16.total("all_gather") - fp8.total("all_gather") == 2 * linears  # forward and backward, 1 byte saved
    assert fp8.total("reduce_scatter") == bf16.total("reduce_scatter")  # gradients still reduce in fp32
