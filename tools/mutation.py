"""Mutation testing, file by file, with mutmut 3: which planted bugs the suite catches in the code where a silent
bug costs a training run or a checkpoint.

    pip install "mutmut>=3.8"               # forkserver isolation; not a test extra: not part of CI
    python tools/mutation.py                # every file of TARGETS, in order
    python tools/mutation.py kernels/noise.py engine/health.py --out benchmarks/results
    python tools/mutation.py engine/checkpoint.py --recheck   # survivors again after new tests, and what a
                                                              # time limit left unchecked

For each file it copies the tracked tree into a scratch directory, writes mutmut's configuration into that copy's
pyproject.toml ([tool.mutmut]: `source_paths` = the one file, `pytest_add_cli_args_test_selection` = the tests of
TARGETS that exercise it, `process_isolation = "forkserver"`: torch is not fork-safe once its threads have run,
and plain fork deadlocks), and runs `mutmut run`. mutmut first runs those tests once to learn which test executes
which function, then runs each mutant against only the tests that executed the mutated function. The outcome of
every mutant is read from mutmut's .meta file and the diff of every survivor from `mutmut show`.

The report (mutation_<date>.md and .json in --out): per file, mutants made / killed / survived / timed out /
without a test, the kill rate, and every survivor with its diff, marked equivalent where EQUIVALENT gives the
reason. Survivors that are not equivalent are the suite's gaps: kill them with a test.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {
    "kernels/noise.py": ["tests/test_mask_strategies.py",
                         "--deselect", "tests/test_mask_strategies.py::test_training_with_each_strategy"],
    "engine/health.py": ["tests/test_faults.py", "-k", "health or last_good_checkpoint or restart or vote or reason"],
    "kernels/loss.py": ["tests/test_loss_reference.py", "tests/test_kernels_triton.py",
                        "-k", "not masking and not unshuffle and not shape0"],
    "kernels/masking.py": ["tests/test_kernels_triton.py", "tests/test_model.py"],
    "engine/optim.py": ["tests/test_optim_units.py"],
    "engine/step.py": ["tests/test_step_units.py", "tests/test_step.py",
                       "-k", "not benchmark_step_is_the_trainers and not records_what_auto"],
    "engine/checkpoint.py": ["tests/test_checkpoint_units.py", "tests/test_checkpoint_safety.py",
                             "tests/test_dcp_payloads.py", "tests/test_checkpoint_export.py", "tests/test_hf.py",
                             "-k", "not kill_during and not strictly_into_timm"],
    "pipelines/common.py": ["tests/test_sampling_properties.py", "tests/test_data_torchvision.py", "tests/test_shards.py"],
    "pipelines/torchvision.py": ["tests/test_sampling_properties.py", "tests/test_data_torchvision.py"],
}
"""The files where a silent bug costs a run or a checkpoint, smallest first, with the tests that exercise them
(pytest arguments: a `--deselect` or `-k` leaves out slow tests that run a file's functions only end to end or in
subprocesses, which mutmut's in-process coverage does not see anyway; the loss leaves out its 224-pixel case, 8 s
under the interpreter, whose p = 16 tiling a 32-pixel case also runs)."""

SCOPE = {
    "pipelines/common.py": ["pipelines.common.x_sample_crop__mutmut_*", "pipelines.common.x_sample_rng__mutmut_*",
                            "pipelines.common.xǁEpochPlanǁ*"],
    "pipelines/torchvision.py": ["pipelines.torchvision.xǁImageFilesǁtransform__mutmut_*",
                                 "pipelines.torchvision.xǁImageFilesǁget_with_skips__mutmut_*"],
}
"""Files mutated in some functions only (mutmut name patterns): of pipelines/, the augmentation (crop, flip, the
per-sample random stream) and the sharding (the epoch plan: each rank's slice of each epoch); the rest of those files
(file listing, quarantine, worker shutdown) decides neither a training number nor a run's safety."""

TARGETS_WANTED = {"engine/checkpoint.py": 0.95, "kernels/loss.py": 0.95, "kernels/masking.py": 0.95}
"""Kill rates asked for; every other file 0.85."""

_BUDGET = "the try budget only matters when a target cannot be met, and then only how long the search goes on"
_NEVER_GATHERED = ("more mask-token rows than L - K: ids_restore indexes [0, L) only, so the extra rows are "
                   "never gathered")
_AUTOGRAD_CASTS = ("a gradient buffer in the default dtype: the kernel only copies values into it, and autograd "
                   "casts a gradient to its input's dtype (round to nearest even, as the kernel's store does)")
_TILE = ("the tile height from L - cls instead of L + cls: the grid is cut from the same block height, so every "
         "row is still covered once; only the tile shape changes")
_COUNT = ("mask_count is mask.sum() by contract (the same value, known on the host: it saves a reduction), so "
          "dividing by mask.sum() instead gives the same loss")
_LOSS_TILE = ("a larger tile or more patches per program: every patch is still covered once (lanes past the patch "
              "are masked out of every load), the sums are the same; only the register use changes, which the AOT "
              "compile for a named GPU target reports")
EQUIVALENT: dict[str, str] = {
    "kernels.noise.x_block_mask__mutmut_2": _BUDGET + " (default max_tries 1000 -> 1001)",
    "kernels.noise.x_block_mask__mutmut_12": _BUDGET + " (the count of tries starts at 1)",
    "kernels.noise.x_block_mask__mutmut_20": _BUDGET + " (one more try)",
    "kernels.noise.x_block_mask__mutmut_23": _BUDGET + " (half the tries)",
    "kernels.noise.x_block_mask__mutmut_54": "h and w swap roles: the aspect law is symmetric (log-uniform on "
                                             "[0.3, 1/0.3]), so the masks have the same distribution",
    "kernels.noise.x_block_mask__mutmut_59": "as mutmut_54 (w takes h's formula)",
    "kernels.noise.x_block_mask__mutmut_75": "torch.randint(high) is torch.randint(0, high): the same draw",
    "kernels.noise.x_block_mask__mutmut_89": "torch.randint(high) is torch.randint(0, high): the same draw",
    **{f"pipelines.common.x_sample_crop__mutmut_{k}": "the fallback's clamp taken at an aspect equal to the "
                                                       "range's end: the clamped box is then the whole image, as the "
                                                       "unclamped branch gives" for k in (53, 66)},
    **{f"pipelines.common.xǁEpochPlanǁepoch_indices__mutmut_{k}": "another fixed seed formula for an epoch's "
                                                                   "permutation: other orders of the same law, still "
                                                                   "a pure function of (seed, epoch) with every "
                                                                   "property the tests hold (the recorded run pins "
                                                                   "the exact orders end to end)" for k in (3, 5)},
    **{f"pipelines.torchvision.xǁImageFilesǁtransform__mutmut_{k}": "antialias on a PIL image: torchvision ignores "
                                                                     "it there (PIL always antialiases)"
       for k in (6, 10, 11, 31, 39, 40)},
    "pipelines.torchvision.xǁImageFilesǁtransform__mutmut_41": "random() <= p instead of < p: random() is exactly p "
                                                               "with probability 0",
    **{f"engine.step.xǁTrainStepǁbody__mutmut_{k}": "autocast's weight-cast cache off (False or None): each weight "
                                                    "is cast again instead of once per step, to the same values"
       for k in (1, 29)},
    "engine.step.xǁTrainStepǁ_total_norm__mutmut_16": "_foreach_norm's order defaults to 2",
    "engine.step.xǁTrainStepǁ_total_norm__mutmut_22": "all_reduce_'s op defaults to sum",
    "engine.optim.x_build_optimizer__mutmut_51": "AdamW's default weight decay: each of the two groups carries "
                                                 "its own, which is what AdamW applies",
    "engine.optim.x_supports_found_inf__mutmut_4": "bool(None) is bool(False)",
    "engine.optim.x_lr_at__mutmut_3": "warm-up when warmup_steps >= 0 instead of > 0: with no warm-up, step < 0 "
                                      "never holds (steps count from 0)",
    "engine.optim.x_lr_at__mutmut_5": "the warm-up's last point taken from its line (lr * w / w) instead of the "
                                      "cosine at t = 0 (min_lr + (lr - min_lr)): both are lr",
    **{f"kernels.noise.x_block_mask__mutmut_{k}": "a rectangle with a side of 0 covers no patch, and 0 < new "
                                                   "refuses it as it refuses any that adds nothing" for k in (63, 66)},
    "kernels.noise.x_block_mask__mutmut_104": "accepting a rectangle that adds no patch (new = 0) masks nothing more",
    "kernels.noise.x_grid_noise__mutmut_39": "torch.randint(high) is torch.randint(0, high): the same draw",
    "kernels.noise.x_grid_noise__mutmut_53": "the lattice offset mirrored (idx + off instead of idx - off): the "
                                             "offset is uniform over the stride, so the lattices have the same law",
    "kernels.noise.x_grid_noise__mutmut_59": "as mutmut_53, for the columns",
    "engine.health.xǁHealthǁobserve_weights__mutmut_16": "when the streak already starts at this step, setting it to "
                                                         "this step again changes nothing",
    "engine.health.xǁHealthǁlast_good_checkpoint__mutmut_7": 'float("INF") is float("inf")',
    **{f"kernels.masking.x_unshuffle_torch__mutmut_{k}": _NEVER_GATHERED for k in (7, 9, 30)},
    **{f"kernels.masking.x_unshuffle_torch__mutmut_{k}": "a [1, D] mask token broadcasts in expand() as [1, 1, D] "
                                                         "does" for k in (25, 26)},
    "kernels.masking.x_unshuffle_torch__mutmut_72": "a [T, D] embedding broadcasts over the batch as [1, T, D] does",
    "kernels.masking.xǁ_RandomMaskingFnǁforward__mutmut_4": "noise kept in its own dtype: the kernel converts what it "
                                                            "loads to fp32 itself, rounding as the host cast does",
    **{f"kernels.masking.xǁ_RandomMaskingFnǁbackward__mutmut_{k}": _AUTOGRAD_CASTS for k in (12, 17)},
    **{f"kernels.masking.xǁ_UnshuffleFnǁbackward__mutmut_{k}": _AUTOGRAD_CASTS for k in (24, 29)},
    "kernels.masking.xǁ_UnshuffleFnǁbackward__mutmut_94": "the mask token's gradient left in fp32: autograd casts a "
                                                          "gradient to its parameter's dtype, the same rounding",
    **{f"engine.checkpoint.x_load_model_state__mutmut_{k}": "strict loading after _check_keys, which has already "
                                                            "refused any missing, unexpected or mis-shaped key: "
                                                            "strict has nothing left to refuse" for k in (8, 10, 11)},
    **{f"engine.checkpoint.x_import_weights__mutmut_{k}": "timm's head_drop is a Dropout: no state-dict key starts "
                                                          "with it, so dropping it or not is the same"
       for k in (43, 44)},
    **{f"engine.checkpoint.x__foreign_globals__mutmut_{k}": "a torch zip without data.pkl names nothing either way: "
                                                             "next() without its default, read(None) and b\"XXXX\" "
                                                             "all raise inside the try, which returns []"
       for k in (8, 14, 16)},
    **{f"engine.checkpoint.x_ensure_writable__mutmut_{k}": "the write probe's mode and its one byte: the probe is "
                                                            "removed at once, its mode and bytes never read"
       for k in (17, 20, 25, 26)},
    "engine.checkpoint.x_read_dcp_metadata__mutmut_37": "the damaged metadata's cause cut at 161 characters instead "
                                                        "of 160: one character more of a message",
    "engine.checkpoint.x_read_dcp_metadata__mutmut_49": "DCP's Metadata always has storage_data: getattr without a "
                                                        "default finds it",
    **{f"engine.checkpoint.x_read_dcp_metadata__mutmut_{k}": "every storage entry of DCP's Metadata has a "
                                                              "relative_path: the default is never used"
       for k in (56, 59, 62)},
    "engine.checkpoint.x_read_dcp_metadata__mutmut_72": "the refused shard name cut at 81 characters instead of 80: "
                                                        "one character more of a message",
    "engine.checkpoint.x_save_training_checkpoint__mutmut_91": "a file opened only to be fsync'ed is never read: "
                                                               "text or binary mode opens it the same way",
    **{f"engine.checkpoint.x_save_training_checkpoint__mutmut_{k}": "rank 0 wrote .writer into this directory at the "
                                                                     "start of this same save: at the rename it is "
                                                                     "there, so missing_ok is never consulted"
       for k in (100, 104)},
    "engine.checkpoint.x_safe_dcp_reader__mutmut_10": "DCP's Metadata is a dataclass with a storage_meta field "
                                                      "(None when absent): getattr without a default finds it too",
    "engine.checkpoint.x_remove_stale_temp_files__mutmut_54": "age > limit or age >= limit: the age is a float of "
                                                              "wall-clock time, equal to the limit only on a "
                                                              "measure-zero instant",
    **{"kernels.loss." + n: _COUNT for n in ("x_norm_pix_mse_torch__mutmut_45", "xǁ_NormPixMSEFnǁforward__mutmut_38",
                                             "x__finish__mutmut_13", "x_norm_pix_mse_triton__mutmut_27",
                                             "x_norm_pix_mse_triton__mutmut_39")},
    **{f"kernels.loss.x__loss_blocks__mutmut_{k}": _LOSS_TILE for k in (3, 8, 9, 15, 22, 23)},
    "kernels.loss.x__finish__mutmut_24": "the count argument when there is none: the kernel reads it only under "
                                         "HAS_COUNT",
    "kernels.loss.x__launch_loss__mutmut_23": "the partial sums' buffer a column wider: the kernels index it by the "
                                              "same arithmetic on both sides, the extra column is never read",
    "kernels.loss.x__finish__mutmut_8": "the result buffer one element longer: the loss and 1 / count are its first "
                                        "two, the third is never read",
    "kernels.loss.x__finish__mutmut_21": "a second program of the one-program finish writes the same two values",
    "kernels.loss.x__launch_loss__mutmut_73": "the gradient-scale pointer when there is none: read only under "
                                              "HAS_GSCALE, so None stands for the unused dummy",
    "kernels.loss.x__launch_loss__mutmut_81": "the dummy buffer returned as the gradient when none was written: the "
                                              "forward keeps it only when it asked for one",
    **{f"kernels.loss.x__launch_loss__mutmut_{k}": "num_warps None or left out: Triton's default, 4, the value given"
       for k in (49, 71)},
    "kernels.loss.xǁ_NormPixMSEFnǁforward__mutmut_4": "the mask left in its dtype: masks reach the loss as fp32 "
                                                      "(random_masking's output), already what the kernel loads",
    "kernels.loss.xǁ_NormPixMSEFnǁforward__mutmut_43": "ctx.scaled None or False: both false",
    "kernels.loss.xǁ_NormPixMSEFnǁbackward__mutmut_4": "the incoming gradient left in its dtype: the loss is fp32, so "
                                                       "its gradient is",
    "kernels.loss.xǁ_NormPixMSEFnǁbackward__mutmut_50": "out[1:3] of the two-element result is out[1:2]",
    **{f"kernels.masking.x__tile__mutmut_{k}": "a tile of other rows per program (4097 elements instead of 4096, "
                                               "at least 2 rows): every row still covered once, the same values; "
                                               "only speed changes" for k in (1, 25)},
    **{f"kernels.masking.xǁ_RandomMaskingFnǁforward__mutmut_{k}": "another power-of-two warp count for the masking "
                                                                   "kernel (Triton's default 4, or 4 / 8 at another "
                                                                   "length): the same values, only speed changes"
       for k in (83, 98, 101, 102, 104, 105)},
    "kernels.masking.x_random_masking_torch__mutmut_7": "a position embedding reshaped to [L, D] broadcasts over the "
                                                        "batch as [1, L, D] does",
    **{f"kernels.masking.x_random_masking_torch__mutmut_{k}": "argsort's dim defaults to the last, which is dim 1 of "
                                                               "the [N, L] noise" for k in (38, 47)},
    **{f"kernels.masking.x_random_masking_torch__mutmut_{k}": "ids_restore sorts a permutation: no ties, so a stable "
                                                               "sort and an unstable one agree" for k in (48, 50)},
    "kernels.masking.xǁ_RandomMaskingFnǁforward__mutmut_109": _AUTOGRAD_CASTS,
    **{f"kernels.masking.xǁ_RandomMaskingFnǁforward__mutmut_{k}": "int64 index tensors are never differentiable: "
                                                                   "marking them or not is the same" for k in (114, 115)},
    "kernels.masking.xǁ_UnshuffleFnǁforward__mutmut_40": _TILE,
    "kernels.masking.xǁ_UnshuffleFnǁbackward__mutmut_12": _TILE,
    **{f"kernels.masking.xǁ_UnshuffleFnǁbackward__mutmut_{k}": "the one-element dummy for the unused sum pointer "
                                                               "(no mask-token gradient wanted) is never read or "
                                                               "written" for k in (38, 41, 42, 43)},
}
"""mutant name -> why it cannot change behaviour (a log message, a default that is always passed, ...)."""

_DEVICE = ("a kernel buffer allocated without the input's device: on a CPU that is the input's device, on a GPU "
           "the kernel would be handed host memory")
_CPU_MAP = "the map to the CPU of {}: saved on a GPU it would load back there; on a CPU every map is the CPU"
_ON_HOST = ("{} made without the step's device: on a CPU that is the default device, on a GPU it would be a host "
            "tensor")
GPU_ONLY: dict[str, str] = {  # (a seed's range is not a behaviour a test can hold without fixing the masks)
    "kernels.noise.x__cpu_generator__mutmut_": "the seed of the block masks' CPU stream when the given generator "
                                              "cannot serve (one on a GPU, or none): another seed range gives other masks of "
                                              "the same law, and only a GPU generator tells the device mutants apart",
    **{f"engine.health.xǁStopVoteǁstep__mutmut_{k}": "the vote's CUDA branch (the answer copied to pinned memory "
                                                      "behind an event) and the device of its tensor: on a CPU the "
                                                      "branch never runs; the fake-group test holds the protocol"
       for k in (5, 8, *range(17, 33))},
    **{f"engine.checkpoint.x__raise_together__mutmut_{k}": "the failure flag's device under NCCL (a CUDA tensor; "
                                                            "gloo, the only backend on a CPU, takes the CPU one)"
       for k in (1, 2, 4, 5, 6, 7, 8, 9, 11, 12, 18, 20)},
    **{f"engine.checkpoint.x__weights_only_bytes__mutmut_{k}": _CPU_MAP.format("a tensor inside a sharded "
                                                                                "non-tensor value") for k in (3, 6)},
    **{f"engine.checkpoint.x_load_training_checkpoint__mutmut_{k}": "a sharded checkpoint read whole instead of "
                                                                     "into each rank's shards: only a model sharded "
                                                                     "over several ranks (a GPU job) tells them "
                                                                     "apart; in one process the two are the same "
                                                                     "tensors" for k in (18, 20)},
    **{f"engine.checkpoint.x_load_training_checkpoint__mutmut_{k}": "a file checkpoint's optimizer state loaded as a "
                                                                     "full state dict into sharded parameters: on one "
                                                                     "rank a shard is the whole tensor, so full and "
                                                                     "sharded loading are the same; only a model "
                                                                     "sharded over several ranks (a GPU job) tells "
                                                                     "them apart" for k in (71, 75)},
    **{f"engine.step.xǁTrainStepǁbody__mutmut_{k}": _ON_HOST.format("the step's loss accumulator") for k in (8, 11)},
    **{f"engine.step.xǁTrainStepǁ_grad_norm__mutmut_{k}": _ON_HOST.format("the zero gradient norm before any "
                                                                          "backward") for k in (7, 9)},
    **{f"engine.step.x_build_training__mutmut_{k}": "the capture on when the device is CUDA: on a CPU it is off "
                                                     "either way" for k in (118, 119)},
    **{f"engine.step.xǁTrainStepǁ__init____mutmut_{k}": _ON_HOST.format("the gradient norm before the first step")
       for k in (24, 26)},
    "engine.step.xǁTrainingǁenable_graph__mutmut_1": "capture on by default: a capture needs CUDA, so on a CPU every "
                                                     "caller passes capture=False",
    **{f"engine.checkpoint.x_load_checkpoint__mutmut_{k}": _CPU_MAP.format("a file checkpoint") for k in (7, 10)},
    "engine.checkpoint.x_capture_rng__mutmut_": "the CUDA generators' states: captured only once CUDA is in use",
    "engine.checkpoint.x_restore_rng__mutmut_": "the CUDA generators' states: restored only where CUDA is available",
    **{f"kernels.masking.xǁ_RandomMaskingFnǁforward__mutmut_{k}": _DEVICE for k in (9, 14, 23, 27, 32, 36, 41, 45)},
    **{f"kernels.loss.x__launch_loss__mutmut_{k}": _DEVICE for k in (17, 21)},
    **{f"kernels.masking.x_random_masking_torch__mutmut_{k}": _DEVICE for k in (23, 26, 76, 80)},
    **{f"kernels.masking.x_random_masking_triton__mutmut_{k}": _DEVICE for k in (31, 34)},
    **{f"kernels.masking.x__tile__mutmut_{k}": "a tile width that is not a power of two (513, 129): the interpreter "
                                               "takes it, a GPU compile refuses it" for k in (2, 10)},
    **{f"kernels.masking.xǁ_RandomMaskingFnǁforward__mutmut_{k}": "a warp count that is not a power of two (5, 9): "
                                                                   "the interpreter runs a program without warps, "
                                                                   "Triton refuses it on a GPU" for k in (103, 106)},
    **{f"kernels.loss.x__finish__mutmut_{k}": _DEVICE for k in (3, 6)},
    "kernels.loss.x__launch_loss__mutmut_79": "5 warps instead of 4: the interpreter runs a program without warps; "
                                              "on a GPU Triton refuses a warp count that is not a power of two",
    **{f"kernels.masking.xǁ_RandomMaskingFnǁbackward__mutmut_{k}": _DEVICE for k in (11, 16)},
    **{f"kernels.masking.xǁ_UnshuffleFnǁforward__mutmut_{k}": _DEVICE for k in (16, 21)},
    **{f"kernels.masking.xǁ_UnshuffleFnǁbackward__mutmut_{k}": _DEVICE for k in (23, 28, 37, 40, 46, 49, 54, 58)},
}
"""mutant name, or a prefix ending in "_", -> why only a GPU can tell (reported apart: not killed here, not
equivalent)."""

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "killed"}


def in_scope(target: str, name: str) -> bool:
    """Whether mutant `name` of `target` is one the run is about (every mutant of a file without a SCOPE)."""
    return target not in SCOPE or any(fnmatch.fnmatchcase(name, pat) for pat in SCOPE[target])


def _function(pattern: str) -> str:
    """The function (or class) a SCOPE pattern names: "pipelines.common.xǁEpochPlanǁ*" -> "EpochPlan"."""
    name = pattern.split(".", 2)[2].removesuffix("__mutmut_*").removesuffix("ǁ*")
    return name[2:].replace("ǁ", ".")


def gpu_only(name: str) -> str | None:
    """Why only a GPU can tell this mutant apart (GPU_ONLY), or None."""
    return GPU_ONLY.get(name) or next((v for k, v in GPU_ONLY.items() if k.endswith("_") and name.startswith(k)),
                                      None)


def tracked_tree(dest: Path) -> None:
    """Copy the files git tracks (and untracked ones it does not ignore) into dest."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def configure(work: Path, target: str, tests: list[str]) -> None:
    py = work / "pyproject.toml"
    py.write_text(py.read_text() + "\n[tool.mutmut]\n" + f"source_paths = [{json.dumps(target)}]\n"
                  + f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
                  + 'pytest_add_cli_args = ["-n", "0"]\n'  # one process: mutmut runs its own children
                  + 'also_copy = ["engine", "kernels", "pipelines", "benchmarks", "tests"]\n'
                  + 'process_isolation = "forkserver"\n')


def run_file(target: str, tests: list[str], max_children: int, timeout_s: int, only: list[str] | None = None) -> dict:
    """Mutate `target` in a scratch copy and run its mutants (or only the named ones: their outcomes, the others
    "not checked") against `tests`; the row of the report."""
    with tempfile.TemporaryDirectory(prefix="mae-mutation-") as tmp:
        work = Path(tmp)
        tracked_tree(work)
        configure(work, target, tests)
        start = time.perf_counter()
        scope = SCOPE.get(target, [])
        try:
            subprocess.run(["mutmut", "run", "--max-children", str(max_children), *(only or scope)], cwd=work,
                           timeout=timeout_s,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        seconds = round(time.perf_counter() - start)
        meta = work / "mutants" / (target + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
        outcome = {name: ("not checked" if code is None else STATUS.get(code, "suspicious"))
                   for name, code in codes.items() if in_scope(target, name)}
        survivors = {}
        for name, status in outcome.items():
            if status == "survived":
                shown = subprocess.run(["mutmut", "show", name], cwd=work, capture_output=True, text=True).stdout
                survivors[name] = "\n".join(x for x in shown.splitlines() if x.startswith(("+", "-"))
                                            and not x.startswith(("+++", "---")))
    counts = {s: sum(1 for v in outcome.values() if v == s) for s in
              ("killed", "survived", "timeout", "no tests", "not checked", "suspicious", "skipped")}
    row = {"file": target, "tests": tests, "made": len(outcome), **counts, "seconds": seconds, "finished": finished,
           "survivors": survivors, "outcome": {n: outcome.get(n, "not checked") for n in only or []},
           "unchecked": sorted(n for n, v in outcome.items() if v == "not checked")}
    return rates(row)


def rates(row: dict) -> dict:
    """The row's equivalent and GPU-only counts and kill rates, from its counts and survivors."""
    survivors = row["survivors"]
    decided = row["killed"] + row["survived"] + row["timeout"]
    equivalent = [n for n in survivors if n in EQUIVALENT]
    gpu = [n for n in survivors if gpu_only(n)]
    kept = row["killed"] + row["timeout"] + len(equivalent)
    rate = kept / decided if decided else None
    cpu = kept / (decided - len(gpu)) if decided > len(gpu) else None
    return {**row, "equivalent": len(equivalent), "gpu_only": len(gpu),
            "kill_rate": None if rate is None else round(rate, 4),
            "kill_rate_cpu": None if cpu is None else round(cpu, 4), "wanted": TARGETS_WANTED.get(row["file"], 0.85)}


def recheck(row: dict, max_children: int, timeout_s: int) -> dict:
    """Run a report row's survivors again (the equivalent ones and those only a GPU tells apart stay as they are)
    against today's tests, and the mutants a time limit left unchecked: a survivor a new test kills moves to killed,
    an unchecked mutant to its outcome. Mutant names hold while the mutated file is unchanged since the full run."""
    names = [n for n in row["survivors"] if n not in EQUIVALENT and not gpu_only(n)]
    unchecked = list(row.get("unchecked", []))
    if not names and not unchecked:
        return rates(row)
    again = run_file(row["file"], TARGETS[row["file"]], max_children, timeout_s, only=names + unchecked)
    status = again["outcome"]
    gone = [n for n in names if status.get(n) in ("killed", "timeout")]
    survivors = {n: d for n, d in row["survivors"].items() if n not in gone}
    survivors.update({n: again["survivors"].get(n, "") for n in unchecked if status.get(n) == "survived"})
    counts = {k: row[k] for k in ("killed", "timeout", "no tests", "suspicious", "skipped") if k in row}
    counts["killed"] += sum(1 for n in gone if status[n] == "killed")
    counts["timeout"] += sum(1 for n in gone if status[n] == "timeout")
    for n in unchecked:
        s = status.get(n, "not checked")
        if s in counts:
            counts[s] += 1
    still = [n for n in unchecked if status.get(n, "not checked") == "not checked"]
    left = row["not checked"] - (len(unchecked) - len(still))  # a row of an older run may not name them
    return rates({**row, **counts, "survived": len(survivors), "not checked": left, "unchecked": still,
                  "survivors": survivors, "outcome": {}, "finished": left == 0,
                  "seconds": row["seconds"] + again["seconds"],
                  "rechecked": {"mutants": len(names), "killed now": len(gone), "unchecked run": len(unchecked)
                                - len(still)}})


def write_report(rows: list[dict], out: Path) -> Path:
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out.mkdir(parents=True, exist_ok=True)
    table = out / f"mutation_{day}.json"
    rows = [{"date": day, **{k: v for k, v in r.items() if k != "outcome"}} for r in rows]
    earlier = sorted(out.glob("mutation_*.json"))
    if earlier:  # the rows of files not run this time are kept from the newest report, with the day they ran
        done = {r["file"] for r in rows}
        prev = earlier[-1]
        kept = [{"date": prev.stem.removeprefix("mutation_"), **r} for r in json.loads(prev.read_text())]
        rows = [r for r in kept if r["file"] not in done] + rows
    order = list(TARGETS)
    rows = sorted(rows, key=lambda r: order.index(r["file"]) if r["file"] in order else len(order))
    table.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"# Mutation testing ({day}, CPU, mutmut 3)", "",
             "Command: `python tools/mutation.py` (each file in its own scratch copy; each mutant runs the tests that "
             "executed the mutated function). A timed-out mutant counts as killed (the suite did not pass); "
             "equivalent survivors (tools/mutation.py EQUIVALENT, with the reason) count as killed; survivors only a "
             "GPU can tell apart (GPU_ONLY) count as survivors, and the next column leaves them out.", "",
             "A mutant whose test process crashed (a segfault or an abort in the interpreter) is counted apart: "
             "neither killed nor survived.", "",
             "| file | run on | tests | made | killed | survived (equivalent, GPU only) | timeout | crashed | no tests | "
             "not checked | kill rate | without GPU-only | wanted | minutes | complete |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = "-" if r["kill_rate"] is None else f"{r['kill_rate']:.1%}"
        cpu = "-" if r.get("kill_rate_cpu") is None else f"{r['kill_rate_cpu']:.1%}"
        shown = ", ".join(Path(t).name for t in r["tests"] if t.startswith("tests/") and "::" not in t)
        lines.append(f"| `{r['file']}` | {r['date']} | {shown} | {r['made']} | {r['killed']} | "
                     f"{r['survived']} ({r['equivalent']}, {r.get('gpu_only', 0)}) | {r['timeout']} | "
                     f"{r.get('suspicious', 0)} | "
                     f"{r['no tests']} | {r['not checked']} | {rate} | {cpu} | {r['wanted']:.0%} | "
                     f"{r['seconds'] / 60:.1f} | {'yes' if r['finished'] else 'no (time limit)'} |")
    scoped = [r["file"] for r in rows if r["file"] in SCOPE]
    if scoped:
        lines += ["", "Mutated in some functions only (tools/mutation.py SCOPE: the augmentation and the sharding; "
                      "the rest of the file lists files and stops workers): " + "; ".join(
                          f"`{f}` " + ", ".join(f"`{_function(p)}`" for p in SCOPE[f]) for f in scoped) + "."]
    rechecked = [r for r in rows if r.get("rechecked")]
    if rechecked:
        lines += ["", "Rechecked (`--recheck`: the survivors of the full run against the tests written after it, "
                      "and the mutants its time limit left; minutes are both runs together): " + "; ".join(
                          f"`{r['file']}` {r['rechecked']['killed now']} of {r['rechecked']['mutants']} survivors "
                          f"now killed, {r['rechecked']['unchecked run']} unchecked mutants run"
                          for r in rechecked) + "."]
    for r in rows:
        if r["survivors"]:
            lines += ["", f"## Survivors in `{r['file']}`", ""]
            for name, diff in r["survivors"].items():
                why = EQUIVALENT.get(name)
                gpu = gpu_only(name)
                verdict = f": equivalent, {why}" if why else f": GPU only, {gpu}" if gpu else ": not yet killed"
                lines += [f"- `{name}`" + verdict, "", "```diff", diff, "```"]
    path = out / f"mutation_{day}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help=f"files to mutate (default: {', '.join(TARGETS)})")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--timeout-s", type=int, default=3600, help="per file")
    ap.add_argument("--recheck", action="store_true",
                    help="run each file's survivors in the newest report again (after new tests), and the mutants its "
                         "time limit left")
    args = ap.parse_args(argv)
    if shutil.which("mutmut") is None:
        print("tools/mutation.py: mutmut is not installed: pip install \"mutmut>=3.8\"", file=sys.stderr)
        return 2
    unknown = [f for f in args.files if f not in TARGETS]
    if unknown:
        print(f"tools/mutation.py: no tests are listed for {', '.join(unknown)}; files: {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    rows = []
    reports = sorted(Path(args.out).glob("mutation_*.json"))
    previous = {r["file"]: r for r in json.loads(reports[-1].read_text())} if reports else {}
    for f in args.files or list(TARGETS):
        if args.recheck:
            if f not in previous:
                print(f"tools/mutation.py: no row for {f} in {Path(args.out)} to recheck", file=sys.stderr)
                return 2
            rows.append(recheck(previous[f], args.max_children, args.timeout_s))
        else:
            rows.append(run_file(f, TARGETS[f], args.max_children, args.timeout_s))
        r = rows[-1]
        print(f"{f}: {r['made']} mutants, {r['killed']} killed, {r['survived']} survived, {r['timeout']} timed out, "
              f"{r['no tests']} without a test ({r['seconds']} s)", flush=True)
        path = write_report(rows, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
