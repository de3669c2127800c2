"""What `mae bench speedup` measures: the lever sets (each a set of the trainer's own levers, engine.levers.LEVERS),
the suites of rows per model, the mask ratios and the targets."""

from __future__ import annotations

RATIOS = (0.5, 0.75, 0.9, 0.95)
# the per-mask-ratio sweep on a GPU (mae bench speedup --speed-suite ratios)
SWEEP_RATIOS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.85, 0.9)
# targets on one H100 (bf16, synthetic input); see ../DESIGN.md for the reference measurements. The ViT-H target
# against the reference's way is held to the strongest reference row of the same run (eager or compiled whole),
# not to a figure measured elsewhere.
TARGETS = {"vit_h_img_s": 1700.0, "vit_l_img_s": 3000.0, "vit_b_img_s": 6000.0, "speedup_vit-h": 3.3,
           "speedup_vit-l": 2.9, "first_step_s": 30.0, "vit_h_b256_peak_gib": 42.8 * 0.85,
           "vit_h_vs_reference": 1.4}
# the ways of training a user of the paper's code has: the strongest of these in the same run is the baseline of
# every "x faster" of the fast path (and, for the dense supervised ViT, of the "vs dense ViT" columns)
REFERENCE_CONFIGS = ("reference", "reference+compile")
SHORT = {"mae_vit_base_patch16": "vit-b", "mae_vit_large_patch16": "vit-l", "mae_vit_huge_patch14": "vit-h"}
# the device suite: (preset, same-batch for all modes, larger MAE-only batch as in DESIGN.md's table)
DEVICE_SUITE = (("vit-b", 256, 1024), ("vit-l", 128, 512), ("vit-h", 128, 256))


# lever sets: the reference's way (eager, torch ops, autocast) and each lever added in turn
CONFIGS = {
    "reference": {"kernels": "torch", "compile": "none", "graph": False},
    # what a user of the paper's code would do to speed it up: torch.compile of the whole model (autocast, eager
    # optimizer); with mode vit, timm's dense ViT compiled whole
    "reference+compile": {"kernels": "torch", "compile": "model", "graph": False},
    "triton": {"kernels": "auto", "compile": "none", "graph": False},
    "triton+compile": {"kernels": "auto", "compile": "regional", "graph": False},
    "fast": {"kernels": "auto", "compile": "regional", "graph": True},
    "fast+flash": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "flash"},
    "fast+pure": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure"},
    "fast+pure+flash": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                        "attention": "flash"},
    # attention as plain batched matmuls + softmax (fused by the compile): short sequences (65 tokens)
    "fast+math": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "math"},
    # only the encoder's attention (65 tokens at ViT-H) as batched matmuls; the decoder's stays fused
    "fast+encmath": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "encoder-math"},
    "fast+pure+encmath": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                          "attention": "encoder-math"},
    # the encoder's attention in this project's Triton kernel (one program per batch and head, from the qkv output)
    "fast+enctriton": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "encoder-triton"},
    "fast+pure+enctriton": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                            "attention": "encoder-triton"},
    # memory for compute: the first 6 encoder blocks recomputed in backward
    "fast+ckpt6": {"kernels": "auto", "compile": "regional", "graph": True, "checkpoint_blocks": 6},
    # ... or the first 4 decoder blocks: at mask 0.75 a ViT-H decoder block frees 1.07 GiB at batch 256 against an
    # encoder block's 0.66 GiB, for two thirds of its compute (`mae bench memory`)
    "fast+dckpt4": {"kernels": "auto", "compile": "regional", "graph": True, "checkpoint_decoder_blocks": 4},
    "fast+pure+dckpt2": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                         "checkpoint_decoder_blocks": 2},
    # NVIDIA apex's fused LayerNorm in the eager blocks (against "triton"; an error row where apex is absent)
    "triton+apexln": {"kernels": "auto", "compile": "none", "graph": False, "layer_norm": "apex"},
    # apex FusedAdam instead of torch's fused AdamW (against "triton+compile"; it cannot be captured)
    "triton+compile+apexadam": {"kernels": "auto", "compile": "regional", "graph": False, "optimizer": "apex"},
    # float8 encoder GEMMs through torchao (engine/fp8.py): tensorwise scaling, or rowwise; with the padding-free
    # attention kernel; with 6 decoder blocks recomputed (the memory target: fp8 keeps the bf16 inputs for
    # backward and its float8 copies, ~1.4 GiB more than bf16 at ViT-H b256, so 4 blocks are not enough)
    "fast+fp8": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "fp8"},
    "fast+fp8row": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "fp8",
                    "fp8_recipe": "rowwise"},
    "fast+fp8+enctriton": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "fp8",
                           "attention": "encoder-triton"},
    "fast+fp8+dckpt6": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "fp8",
                        "checkpoint_decoder_blocks": 6},
    # inductor's GEMM autotuning with bias / GELU epilogues fused (minutes of compile: a separate section)
    "fast+autotune": {"kernels": "auto", "compile": "regional", "graph": True,
                      "compile_mode": "max-autotune-no-cudagraphs"},
}


# the speed suite (issue targets): per model, the lever ladder at the reference's batch, then the same-batch
# visible-only vs encoder-with-mask-tokens pair with the fastest levers. The first row compiles (time to first
# step with compilation); graph rows come after the eager ones so a capture failure cannot hide them.
# "best": the fastest lever set measured so far for that model in the same process;
# "else:X": X, only when the model's previous row failed.
SPEED_SUITES = {
    # the whole ladder (benchmarks/device_check.sh section speed), most telling rows first in each model so a
    # time limit cuts the least: the compiled row (cold cache), the reference, the lever sets not yet measured
    # on a GPU, the same-batch pairs (the dense baseline also with plain `fast`: a lever that helps the
    # visible-only encoder may slow the dense one, and the target takes the dense baseline's fastest row)
    "full": {
        "vit-h": [("mae", 0.75, 256, "triton+compile"), ("mae", 0.75, 256, "reference"), ("mae", 0.75, 256, "fast"),
                  ("mae", 0.75, 256, "reference+compile"), ("mae", 0.75, 256, "fast+pure"), ("mae", 0.75, 256, "fast+dckpt4"),
                  ("mae", 0.75, 256, "fast+enctriton"), ("mae", 0.75, 256, "fast+encmath"),
                  ("mae", 0.75, 256, "fast+pure+dckpt2"),
                  ("mae", 0.75, 256, "fast+pure+enctriton"), ("mae", 0.75, 128, "best"),
                  ("mae_dense", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "fast"),
                  ("mae", 0.75, 128, "fast"), ("mae", 0.75, 256, "triton"), ("mae", 0.75, 256, "triton+apexln"),
                  ("mae", 0.75, 256, "triton+compile+apexadam"),
                  ("mae", 0.75, 256, "fast+pure+encmath"), ("mae", 0.75, 256, "fast+math"),
                  ("mae", 0.75, 256, "fast+flash"), ("mae", 0.75, 256, "fast+ckpt6")],
        # ViT-L's dense baseline also fits at batch 256 (ViT-H's does not on 80 GB): a second same-batch pair
        "vit-l": [("mae", 0.75, 512, "fast"), ("mae", 0.75, 512, "fast+enctriton"), ("mae", 0.75, 512, "fast+encmath"),
                  ("mae", 0.75, 256, "best"), ("mae_dense", 0.75, 256, "best"), ("mae_dense", 0.75, 256, "fast"),
                  ("mae", 0.75, 256, "fast"), ("mae", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "best"),
                  ("mae_dense", 0.75, 128, "fast"), ("mae", 0.75, 128, "fast"), ("mae", 0.75, 512, "reference"),
                  ("mae", 0.75, 512, "fast+pure+enctriton")],
        "vit-b": [("mae", 0.75, 1024, "fast"), ("mae", 0.75, 1024, "fast+enctriton"),
                  ("mae", 0.75, 1024, "fast+encmath"), ("mae", 0.75, 1024, "reference")],
    },
    # only the newest levers and the targets' rows, for a short device call
    "new": {
        "vit-h": [("mae", 0.75, 256, "fast+enctriton"), ("mae", 0.75, 256, "fast+encmath"),
                  ("mae", 0.75, 256, "fast+dckpt4"), ("mae", 0.75, 256, "fast+pure"),
                  ("mae", 0.75, 256, "fast+pure+dckpt2"), ("mae", 0.75, 128, "best"),
                  ("mae_dense", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "fast")],
        "vit-l": [("mae", 0.75, 512, "fast+enctriton"), ("mae", 0.75, 512, "fast+encmath")],
        "vit-b": [("mae", 0.75, 1024, "fast+enctriton"), ("mae", 0.75, 1024, "fast+encmath")],
    },
    # the baselines a user could pick, in the same run as the fast path (ViT-H b256: the paper's code eager and
    # compiled whole, 118 s to first step; the dense supervised ViT eager and compiled at the same-batch size)
    "baselines": {
        "vit-h": [("mae", 0.75, 256, "fast"), ("mae", 0.75, 256, "reference"), ("mae", 0.75, 256, "reference+compile"),
                  ("vit", None, 128, "reference"), ("vit", None, 128, "reference+compile"),
                  ("mae_dense", 0.75, 128, "reference+compile")],
        "vit-l": [("mae", 0.75, 512, "fast"), ("mae", 0.75, 512, "reference"), ("mae", 0.75, 512, "reference+compile"),
                  ("vit", None, 128, "reference"), ("vit", None, 128, "reference+compile")],
    },
    # throughput and memory per mask ratio: the fast path and the reference's way at one batch, with the
    # encoder-with-mask-tokens baseline (its cost does not depend on the ratio) in both lever sets
    "ratios": {
        "vit-l": ([("mae", r, 128, "fast") for r in SWEEP_RATIOS] + [("mae_dense", 0.75, 128, "fast")]
                  + [("mae", r, 128, "reference") for r in SWEEP_RATIOS] + [("mae_dense", 0.75, 128, "reference")]),
        "vit-h": ([("mae", r, 128, "fast") for r in SWEEP_RATIOS] + [("mae_dense", 0.75, 128, "fast")]
                  + [("mae", r, 128, "reference") for r in SWEEP_RATIOS] + [("mae_dense", 0.75, 128, "reference")]),
    },
    # past the bf16 wall (issue 16): float8 encoder GEMMs, the padding-free attention kernel, the memory lever; the
    # strongest baseline (the paper's code compiled whole) and plain `fast` in the same run, the dense baseline's
    # fastest row for the same-batch speedup
    "fp8": {
        # the targets' rows first (a time limit keeps what was measured): fast, fp8, the strongest baseline (whose
        # whole-model compile takes ~2 minutes cold), the padding-free attention and the memory lever with fp8, the
        # same-batch pair; then the single levers apart
        "vit-h": [("mae", 0.75, 256, "fast"), ("mae", 0.75, 256, "fast+fp8"), ("mae", 0.75, 256, "reference+compile"),
                  ("mae", 0.75, 256, "fast+fp8+enctriton"), ("mae", 0.75, 256, "fast+fp8+dckpt6"),
                  ("mae", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "fast+fp8"),
                  ("mae", 0.75, 256, "fast+enctriton"), ("mae", 0.75, 256, "fast+fp8row"),
                  ("mae", 0.75, 256, "fast+dckpt4")],
        "vit-l": [("mae", 0.75, 512, "fast"), ("mae", 0.75, 512, "fast+fp8"), ("mae", 0.75, 512, "fast+fp8+enctriton")],
        "vit-b": [("mae", 0.75, 1024, "fast"), ("mae", 0.75, 1024, "fast+fp8"),
                  ("mae", 0.75, 1024, "fast+fp8+enctriton")],
    },
    # inductor's GEMM autotuning: minutes of compile per block shape, so a call of its own
    "autotune": {
        "vit-h": [("mae", 0.75, 256, "fast+autotune")],
        "vit-l": [("mae", 0.75, 512, "fast+autotune")],
    },
}
