"""A small mutation check of the test suite: plant one plausible one-line bug at a time in a copy of the tree, run
the tests that cover it, and report whether they caught it. Not part of CI (minutes per mutant); run by hand:

    python tests/mutate.py                 # every mutant
    python tests/mutate.py eps_outside     # the mutants whose name contains one of the arguments
    python tests/mutate.py --list

Each mutant names the file, the exact text it replaces (found exactly once, so a refactor that moves the line
makes the tool say so instead of testing nothing) and the tests that must fail. Exit 1 when any mutant survives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # the loss: eps placement, unbiased variance, mask weighting (reference and kernel)
    Mutant("eps_outside_sqrt_reference", "kernels/loss.py", "target = (target - mean) / (var + eps) ** 0.5",
           "target = (target - mean) / (var ** 0.5 + eps)", ("tests/test_loss_reference.py",)),
    Mutant("eps_outside_sqrt_triton", "kernels/loss.py", "rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)",
           "rstd = 1.0 / (tl.sqrt(tl.maximum(var, 0.0)) + eps)",
           ("tests/test_loss_reference.py::test_eps_sits_inside_the_square_root",)),
    Mutant("biased_variance_reference", "kernels/loss.py", "var = target.var(dim=-1, keepdim=True)  # unbiased",
           "var = target.var(dim=-1, keepdim=True, unbiased=False)", ("tests/test_loss_reference.py",)),
    Mutant("loss_counts_kept_patches", "kernels/loss.py", "return (loss * mask).sum() / (mask.sum()",
           "return loss.sum() / (mask.sum()", ("tests/test_loss_reference.py",)),
    Mutant("triton_loss_reads_kept_patches", "kernels/loss.py", "rem = gm & (mk != 0.0)  # kept patches",
           "rem = gm  # kept patches", ("tests/test_kernels_triton.py::test_loss_reads_nothing_of_kept_patches",)),
    Mutant("triton_loss_patch_row_index", "kernels/loss.py", "gh = l // GW", "gh = l % GW",
           ("tests/test_kernels_triton.py::test_loss_fp32_matches_reference",)),
    # the masking / unshuffle kernels' index arithmetic
    Mutant("triton_mask_off_by_one", "kernels/masking.py", "tl.store(mask_ptr + base + ids, (offs >= K)",
           "tl.store(mask_ptr + base + ids, (offs > K)", ("tests/test_kernels_triton.py::test_masking_matches_reference",)),
    Mutant("triton_unshuffle_skips_cls", "kernels/masking.py", "src = tl.where(is_cls, 0, r + HAS_CLS)",
           "src = tl.where(is_cls, 0, r)", ("tests/test_kernels_triton.py::test_unshuffle_matches_reference",)),
    Mutant("triton_masking_pos_of_wrong_row", "kernels/masking.py",
           "pv = tl.load(pos_ptr + src[:, None] * D + dd[None, :], mask=m2)",
           "pv = tl.load(pos_ptr + j[:, None] * D + dd[None, :], mask=m2)",
           ("tests/test_kernels_triton.py::test_masking_with_position_embedding_is_exact",)),
    # the step: non-finite guard, its fallback, accumulation scaling
    Mutant("guard_tests_only_nan", "engine/step.py", "bad = ~torch.isfinite(acc)", "bad = torch.isnan(acc)",
           ("tests/test_step.py::test_non_finite_loss_skips_the_update",)),
    Mutant("fallback_always_steps", "engine/step.py", "elif bad.item() == 0:  # note: a host sync",
           "else:  # note: a host sync", ("tests/test_step.py::test_non_finite_loss_skips_the_update",)),
    Mutant("accumulation_not_scaled", "engine/step.py", "if self.scaler is not None else loss / k).backward()",
           "if self.scaler is not None else loss).backward()",
           ("tests/test_recorded_run.py",)),
    # resume: the optimizer state, the data position
    Mutant("resume_drops_optimizer_state", "engine/checkpoint.py",
           'sdapi.set_optimizer_state_dict(model, optimizer, obj["optim"], options=opts)', "pass",
           ("tests/test_train.py::test_resume_is_bit_identical",)),
    Mutant("mask_strategy_ignored", "engine/trainer.py",
           "noise = make_noise(m.mask_strategy, b * self.world,", 'noise = make_noise("random", b * self.world,',
           ("tests/test_mask_strategies.py::test_the_trainer_masks_with_the_configured_strategy",)),
    # data: flips, crops, resume state, sharding
    Mutant("torchvision_no_flip", "pipelines/torchvision.py", "img = TF.hflip(img)", "img = img",
           ("tests/test_data_dali.py::test_horizontal_flip_rate_and_exactness",)),
    Mutant("dali_no_flip", "pipelines/dali.py", "mirror = fn.random.coin_flip(probability=hflip)", "mirror = 0",
           ("tests/test_data_dali.py::test_horizontal_flip_rate_and_exactness",)),
    Mutant("dali_crop_area_range", "pipelines/dali.py", "random_area=list(scale)", "random_area=[0.08, 1.0]",
           ("tests/test_data_dali.py::test_parity_crop_distribution",)),
    Mutant("dali_resume_state_ignored", "pipelines/dali.py", 'self._checkpoint = state["dali"]', "pass",
           ("tests/test_data_dali.py::test_dali_resume_continues_with_next_unseen_batch",)),
    Mutant("shards_overlap", "pipelines/common.py", "return perm[:, self.rank].reshape(-1).tolist()",
           "return perm[:, 0].reshape(-1).tolist()", ("tests/test_data_torchvision.py",)),
    # schedules and optimizers
    Mutant("lr_warmup_off_by_one", "engine/optim.py", "return lr * step / warmup_steps",
           "return lr * (step + 1) / warmup_steps", ("tests/test_train.py::test_lr_schedule",)),
    Mutant("layer_decay_final_norm_with_last_block", "engine/evaluate.py", 'head=r"^norm|^fc_norm|^head")',
           'head=r"^fc_norm|^head")', ("tests/test_evaluate.py::test_layer_decay_groups_are_the_papers",)),
    Mutant("lars_with_eps", "engine/evaluate.py", "trust_coeff=0.001, eps=0.0)", "trust_coeff=0.001, eps=1e-8)",
           ("tests/test_evaluate.py::test_lars_is_the_papers_bit_for_bit",)),
    Mutant("bf16_pure_gradient_doubled", "engine/mixed.py",
           "torch._foreach_copy_(bufs, [self.copies[i].grad for i in fresh])",
           "torch._foreach_copy_(bufs, [self.copies[i].grad * 2 for i in fresh])",
           ("tests/test_mixed.py::test_bf16_compute_gradients_match_fp32_and_land_on_the_masters",)),
    Mutant("fsdp_reduces_in_bf16", "engine/parallel.py",
           "mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else",
           "mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype) if param_dtype else",
           ("tests/test_parallel.py::test_fsdp2_computes_in_bf16_reduces_in_fp32_and_returns_no_view",)),
    # the captured step's protocol
    Mutant("graph_skip_left_on", "engine/graphstep.py", "c.skip.fill_(False)", "pass",
           ("tests/test_graphstep.py::test_capture_protocol_replays_the_plain_step_exactly",)),
    Mutant("graph_inputs_not_copied", "engine/graphstep.py", "s.copy_(x, non_blocking=True)", "pass",
           ("tests/test_graphstep.py::test_capture_protocol_replays_the_plain_step_exactly",)),
    # faults: divergence, signals, workers
    Mutant("checkpoint_written_in_a_bad_streak", "engine/loop.py",
           "if h.in_streak:  # never a checkpoint of a run in a bad streak", "if False:",
           ("tests/test_faults.py::test_a_diverging_run_writes_no_checkpoint_of_diverged_weights_and_names_the_last_good_one",)),
    Mutant("weights_growth_unchecked", "engine/health.py", "elif self.weight_norm and norm > self.weight_growth",
           "elif False and norm > self.weight_growth",
           ("tests/test_faults.py::test_a_diverging_run_writes_no_checkpoint_of_diverged_weights_and_names_the_last_good_one",)),
    Mutant("workers_die_on_sigterm", "pipelines/torchvision.py",
           "worker_init_fn=ignore_stop_signals if self.num_workers else None,", "worker_init_fn=None,",
           ("tests/test_faults.py::test_a_stop_signal_to_the_process_group_checkpoints_and_exits",)),
    Mutant("unreadable_named_per_worker", "pipelines/torchvision.py", "if path not in warned:  # once per file",
           "if True:  # once per file", ("tests/test_faults.py::test_each_unreadable_file_is_named_once_with_workers",)),
    Mutant("dali_no_full_decode_scan", "pipelines/dali.py", "scanned = _decode_scan(files, suspects, budget_s)",
           "scanned = 0", ("tests/test_data_dali.py::test_dali_names_a_truncated_jpeg_whose_header_is_intact",)),
    # checkpoints: atomic writes, no code from a file
    Mutant("checkpoint_not_atomic", "engine/atomic.py",
           'fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)',
           "fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)",
           ("tests/test_checkpoint_safety.py::test_a_kill_during_a_save_leaves_the_previous_checkpoint",)),
    Mutant("dcp_metadata_any_name_of_an_allowed_module", "engine/checkpoint.py",
           "if (module, name) not in DCP_METADATA_GLOBALS:",
           "if module not in {m for m, _ in DCP_METADATA_GLOBALS}:",
           ("tests/test_dcp_payloads.py",)),
    Mutant("dcp_metadata_trailing_payload_ignored", "engine/checkpoint.py", "            if f.read(1):",
           "            if False:", ("tests/test_dcp_payloads.py",)),
    Mutant("dcp_values_not_weights_only", "engine/checkpoint.py",
           'obj = torch.load(value, map_location="cpu", weights_only=True)',
           'obj = torch.load(value, map_location="cpu", weights_only=False)',
           ("tests/test_dcp_payloads.py::test_a_payload_in_a_shard_value_is_refused_by_the_commands",)),
    Mutant("dcp_resume_without_optimizer_state", "engine/checkpoint.py",
           '        sdapi.set_optimizer_state_dict(model, optimizer, state["optim"])\n        return meta',
           "        return meta",
           ("tests/test_operation.py::test_a_sharded_resume_restores_the_optimizer_state_exactly",)),
    Mutant("inf_applied_to_the_weights", "engine/step.py",
           "bad = ~torch.isfinite(acc) | ~torch.isfinite(self.grad_norm)",
           "bad = torch.isnan(acc) | torch.isnan(self.grad_norm)",
           ("tests/test_operation.py::test_an_infinite_loss_or_gradient_is_never_applied",)),
    Mutant("loader_workers_left_running", "pipelines/torchvision.py", "        finally:\n            stop_workers(it)",
           "        finally:\n            pass",
           ("tests/test_operation.py::test_every_ending_of_a_run_leaves_no_process_behind",)),
    Mutant("stuck_workers_not_killed", "pipelines/common.py", "                    w.kill()", "                    pass",
           ("tests/test_operation.py::test_every_ending_of_a_run_leaves_no_process_behind",)),
    Mutant("refused_resume_writes_config", "engine/trainer.py", "        resume_path = None\n        self.resume_changes",
           "        (self.run_dir / 'config.toml').write_text('x')\n        resume_path = None\n        self.resume_changes",
           ("tests/test_operation.py::test_a_refused_resume_leaves_the_run_directory_as_it_was",)),
    Mutant("resumed_checkpoint_not_last_good", "engine/run.py",
           "            health.saved(self.step, self._resumed_from)", "            pass",
           ("tests/test_operation.py::test_a_rollback_after_a_resume_returns_to_the_resumed_checkpoint",)),
    Mutant("bad_streak_at_the_end_exits_0", "engine/trainer.py", "if health.in_streak and not stop_signal:",
           "if False:",
           ("tests/test_operation.py::test_a_run_that_ends_inside_a_bad_streak_fails_naming_the_last_good_checkpoint",)),
    Mutant("index_past_the_tar_accepted", "pipelines/shards.py",
           "if tar_bytes is not None and off + size > tar_bytes:", "if False:",
           ("tests/test_bad_input.py::test_an_index_past_the_end_of_its_tar_is_named_before_dali_opens_it",)),
    Mutant("loss_tile_that_spills", "kernels/loss.py", "return bq, max(1, min(64, 1024 // (bq * bq)))",
           "return bq, max(1, min(64, 16384 // (bq * bq)))",
           ("tests/test_kernels_compiled.py::test_masking_unshuffle_and_the_loss_never_spill",)),
    Mutant("symlink_loops_followed", "pipelines/common.py", "        if (st.st_dev, st.st_ino) in seen_dirs:",
           "        if False:", ("tests/test_bad_input.py::test_a_symlink_loop_does_not_multiply_the_data_set",)),
    Mutant("stale_temp_of_live_writer_removed", "engine/checkpoint.py", "stale = not _pid_alive(writer[1])",
           "stale = True", ("tests/test_checkpoint_safety.py::test_stale_temp_files_of_dead_writers_are_removed_never_a_live_ones",)),
    Mutant("checkpoint_runs_code", "engine/checkpoint.py",
           'torch.load(path, map_location="cpu", weights_only=True)',
           'torch.load(path, map_location="cpu", weights_only=False)',
           ("tests/test_checkpoint_export.py::test_weights_only_loading_refuses_code",)),
    # float8 encoder GEMMs: nothing converted; FSDP2 gathering bf16 instead of float8
    Mutant("fp8_converts_nothing", "engine/fp8.py", "module_filter_fn=fp8_filter(decoder))",
           "module_filter_fn=lambda m, f: False)",
           ("tests/test_fp8.py",)),
    Mutant("fp8_no_float8_all_gather", "engine/levers.py", "t.fp8_decoder, fsdp=ctx.distributed)",
           "t.fp8_decoder, fsdp=False)", ("tests/test_fp8.py",)),
    # the attention kernel's tail tile too small to cover the sequence
    Mutant("attention_tail_tile_16", "kernels/attention.py",
           "return main, max(16, _pow2(n - main)) if n > main else 16", "return main, 16",
           ("tests/test_kernels_attention.py",)),
    # torchvision workers forked from a process whose DALI threads run
    Mutant("torchvision_forks_after_dali", "pipelines/torchvision.py", 'getattr(dali, "USED", False)', "False",
           ("tests/test_data_dali.py",)),
    # the held-out error measured with random masks whatever the run's strategy
    Mutant("heldout_ignores_mask_strategy", "engine/trainer.py", "strategy=m.mask_strategy)", 'strategy="random")',
           ("tests/test_mask_strategies.py",)),
]


def copy_tree(dst: Path) -> None:
    """The tracked files and the untracked ones git does not ignore (the working tree as it is)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run_mutant(m: Mutant, tree: Path, timeout: int = 900) -> tuple[str, float]:
    """'caught', 'SURVIVED' or 'stale: ...' (the text to replace is not found exactly once)."""
    path = tree / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        return f"stale: the text occurs {n} times in {m.file}", 0.0
    path.write_text(text.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(tree), TRITON_INTERPRET="1")
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *m.tests],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        caught = r.returncode != 0
    except subprocess.TimeoutExpired:
        caught = True  # a hang is caught too (the suite has its own timeouts)
    finally:
        path.write_text(text)
    return ("caught" if caught else "SURVIVED"), time.time() - t0


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--list" in args:
        for m in MUTANTS:
            print(f"{m.name:36s} {m.file}: {m.old!r} -> {m.new!r}")
        return 0
    chosen = [m for m in MUTANTS if not args or any(a in m.name for a in args)]
    results = []
    with tempfile.TemporaryDirectory(prefix="mae_mutate_") as d:
        tree = Path(d)
        copy_tree(tree)
        for m in chosen:
            verdict, secs = run_mutant(m, tree)
            results.append((m, verdict))
            print(f"{verdict:8s} {m.name} ({secs:.0f} s; {', '.join(m.tests)})", flush=True)
    caught = sum(v == "caught" for _, v in results)
    print(f"{caught} of {len(results)} mutants caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
