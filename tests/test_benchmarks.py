import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import speedup, speedup_report
from benchmarks.levers import REFERENCE_CONFIGS, SHORT, SWEEP_RATIOS
from benchmarks.step_runner import flops_for_mode
from engine.config import debug, mae_vit_huge_patch14, mae_vit_large_patch16
from engine.metrics import block_macs, mae_forward_macs, mfu, train_flops_per_image, vit_train_flops_per_image
from engine.model import build_model


def test_block_formula_matches_hand_count():
    # ViT-H encoder block at mask 0.75: T = 64 + 1 tokens, d = 1280
    T, d = 65, 1280
    qkv, proj, mlp = T * d * 3 * d, T * d * d, 2 * T * d * 4 * d
    attn = T * T * d + T * T * d  # QK^T and AV
    assert block_macs(T, d) == qkv + proj + mlp + attn


@pytest.mark.parametrize("tokens,width,heads", [(17, 64, 4), (65, 96, 3)])
def test_block_formula_matches_flop_counter(tokens, width, heads):
    from timm.models.vision_transformer import Block

    blk = Block(width, heads, qkv_bias=True)
    x = torch.randn(1, tokens, width)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # math SDPA: QK^T, AV are counted
        blk(x)
    assert fc.get_total_flops() == 2 * block_macs(tokens, width)


@pytest.mark.parametrize("ratio,dense", [(0.75, False), (0.5, False), (0.75, True)])
def test_model_formula_matches_flop_counter_forward_and_backward(ratio, dense):
    cfg = debug().model
    cfg.encoder_mask_tokens = dense
    model = build_model(cfg)
    imgs = torch.randn(2, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss, _, _ = model(imgs, ratio)
    fwd = fc.get_total_flops()
    assert fwd == 2 * 2 * mae_forward_macs(cfg, ratio)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss.backward()
    # backward = 2 x forward, minus the input-gradient GEMM of the patch embedding (images need none)
    patch_embed = 2 * 2 * cfg.num_patches * 48 * cfg.embed_dim
    assert fc.get_total_flops() == 2 * fwd - patch_embed


def test_design_figures():
    h = mae_vit_huge_patch14().model
    assert train_flops_per_image(h) / 1e9 == pytest.approx(292, abs=1)
    assert speedup_report.speedup_ceiling(h, 0.75) == pytest.approx(3.59, abs=0.01)
    assert speedup_report.speedup_ceiling(mae_vit_large_patch16().model, 0.75) == pytest.approx(3.22, abs=0.01)
    assert vit_train_flops_per_image(h) > train_flops_per_image(h)


def test_mfu_arithmetic():
    assert mfu(1e9, 1000, 1e12) == pytest.approx(1.0)
    assert mfu(292e9, 1700, 989e12) == pytest.approx(0.502, abs=1e-3)  # the ViT-H target is ~50% MFU
    assert mfu(1e9, 1000, None) is None


def test_speedup_arithmetic():
    m = debug().model
    rows = [
        {"model": "d", "mode": "mae", "mask_ratio": 0.75, "batch": 8, "status": "ok", "img_per_s": 300.0},
        {"model": "d", "mode": "mae_dense", "mask_ratio": 0.75, "batch": 8, "status": "ok", "img_per_s": 100.0},
        {"model": "d", "mode": "vit", "mask_ratio": None, "batch": 8, "status": "ok", "img_per_s": 150.0},
        {"model": "d", "mode": "mae", "mask_ratio": 0.9, "batch": 8, "status": "OOM"},
    ]
    (sp,) = speedup.speedup_rows(rows, {"d": m})
    assert sp["speedup_vs_dense"] == 3.0 and sp["speedup_vs_vit"] == 2.0
    assert sp["flop_ceiling_vs_dense"] == pytest.approx(speedup_report.speedup_ceiling(m, 0.75), abs=1e-3)
    lines = speedup_report.target_lines(rows, [sp])
    assert any("not measured" in line for line in lines)


def test_speedup_sweep_writes_all_outputs(tmp_path):
    code = speedup.main(["--models", "debug", "--ratios", "0.5,0.75", "--reps", "2", "--warmup", "1",
                         "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    stem = [n for n in names if n.endswith(".md")][0][:-3]
    assert stem.startswith("speedup_cpu_")
    assert {f"{stem}.csv", f"{stem}.json", f"{stem}.md", f"{stem}_imgs.png"} <= set(names)
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    modes = {(r["mode"], r["mask_ratio"]) for r in data["rows"]}
    assert modes == {("mae", 0.5), ("mae", 0.75), ("mae_dense", 0.5), ("mae_dense", 0.75), ("vit", None)}
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 for r in data["rows"])
    assert data["environment"]["device"] == "CPU"
    md = (tmp_path / f"{stem}.md").read_text()
    assert "CPU" in md and "speedup_vs_dense" in md and "FLOP" in md
    from engine.config import get_preset

    m = get_preset("debug").model
    for r in data["rows"]:  # each derived column follows from the measured step time and the FLOP formula
        assert r["img_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1000), rel=1e-3)
        fl = flops_for_mode(m, r["mode"], r["mask_ratio"] or 0.0)
        assert r["gflops_per_img"] == pytest.approx(fl / 1e9, rel=1e-3)
        assert r["tflops_per_s"] == pytest.approx(fl * r["img_per_s"] / 1e12, rel=1e-3)
        assert r["mfu_datasheet"] is None and r["p20_ms"] <= r["step_ms"] <= r["p80_ms"]
        assert f"| {r['img_per_s']:.4g} |" in md  # the markdown shows the JSON's figure


def test_speedup_bad_args(capsys):
    assert speedup.main(["--models", "vit-z"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert speedup.main(["--modes", "mae,sparse"]) == 2


def test_oom_is_reported_and_sweep_continues(monkeypatch, tmp_path):
    from benchmarks import step_runner as step

    real = step.StepRunner.run

    def flaky(self, *a, **k):
        if self.mode == "mae_dense":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(step.StepRunner, "run", flaky)
    assert speedup.main(["--models", "debug", "--ratios", "0.75", "--reps", "2", "--warmup", "1", "--device", "cpu",
                         "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "OOM", "ok"]


@pytest.mark.parametrize("suite", sorted(speedup.SPEED_SUITES))
def test_every_speed_suite_names_models_and_lever_sets(suite):
    assert set(speedup.SPEED_SUITES[suite]) <= set(SHORT.values()), suite
    plan = speedup.build_plan(list(SHORT), [], [], 0, False, speed_suite=suite)
    ratio_ok = (lambda p: p[2] in SWEEP_RATIOS) if suite == "ratios" else (lambda p: p[2] == 0.75)
    assert plan and all(len(p) == 6 and p[3] > 0 and (
        (p[1] in ("mae", "mae_dense") and ratio_ok(p)) or (p[1] == "vit" and p[2] is None)) and (
        p[5] in speedup.CONFIGS or p[5] == "best" or (p[5].startswith("else:") and p[5][5:] in speedup.CONFIGS))
        for p in plan), plan
    assert len(set(plan)) == len(plan)  # no row twice


def test_speed_suite_plan_orders_levers():
    plan = speedup.build_plan(["mae_vit_huge_patch14", "mae_vit_large_patch16", "mae_vit_base_patch16"],
                              [], [], 0, False, speed_suite=True)
    assert all(len(p) == 6 and (p[5] in speedup.CONFIGS or p[5] == "best" or p[5][5:] in speedup.CONFIGS)
               for p in plan)
    for model in ("mae_vit_huge_patch14", "mae_vit_large_patch16", "mae_vit_base_patch16"):
        rows = [p for p in plan if p[0] == model]
        assert speedup.CONFIGS[rows[0][5]]["compile"] != "none"  # the first row pays the compilation
        assert not rows[0][5].startswith("else:") and rows[0][5] != "best"
        # each same-batch dense row has its visible-only partner with the same levers
        for p in rows:
            if p[1] == "mae_dense":
                assert any(q[1] == "mae" and q[3] == p[3] and q[5] == p[5] for q in rows), p
    h = [p for p in plan if p[0] == "mae_vit_huge_patch14"]
    assert ("mae", 0.75, 256, "reference") in [p[1:4] + (p[5],) for p in h]


def test_lever_rows_jsonl_merge_and_targets(tmp_path, monkeypatch):
    """Rows appended as JSON lines, merged into one report, paired for the targets; the compiled rows labelled cold,
    then warm. The labels are what is tested here: torch.compile is a recorder (a cold inductor compile on this CPU
    costs 30-40 s; compiled training is held to eager in tests/test_agreement.py)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: the first compile is cold
    compiled = []

    def record(fn=None, **kw):
        compiled.append(kw)
        return fn if fn is not None else (lambda f: f)

    monkeypatch.setattr(torch, "compile", record)
    common = ["--models", "debug", "--ratios", "0.75", "--reps", "5", "--warmup", "3", "--device", "cpu",
              "--batch", "4", "--jsonl", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "parts"),
              "--max-spread", "100"]  # a loaded 2-core CPU: the spread bound is tested on its own below
    assert speedup.main(common + ["--modes", "mae,mae_dense", "--config", "fast"]) == 0
    assert speedup.main(common + ["--modes", "mae", "--config", "reference"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    rows = [x["row"] for x in lines if "row" in x]
    assert [(r["mode"], r["config"], r["status"]) for r in rows] == [
        ("mae", "fast", "ok"), ("mae_dense", "fast", "ok"), ("mae", "reference", "ok")]
    assert rows[0]["compile_cache"] == "cold" and rows[1]["compile_cache"] == "warm"
    assert compiled and "compile_cache" not in rows[2]  # the fast rows compiled; the reference row did not
    assert rows[0]["fwd_ms"] is None and rows[2]["fwd_ms"] is not None  # a graph step has no phase split
    assert speedup.main(["--merge", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "merged")]) == 0
    data = json.loads(next((tmp_path / "merged").glob("*.json")).read_text())
    assert len(data["rows"]) == 3
    sp = {x["config"]: x for x in data["speedups"]}
    assert sp["fast"]["speedup_vs_dense"] == round(rows[0]["img_per_s"] / rows[1]["img_per_s"], 3)
    assert "speedup_vs_dense" not in sp["reference"]  # no dense row with the reference levers
    # the targets' pairing: the dense baseline's fastest row of the run and batch, whatever its lever set
    assert sp["reference"]["best_dense_config"] == "fast"
    assert sp["reference"]["speedup_vs_best_dense"] == round(rows[2]["img_per_s"] / rows[1]["img_per_s"], 3)
    md = next((tmp_path / "merged").glob("*.md")).read_text()
    assert "| config |" in md and "ViT-H/14 time to first step" in md and "not measured" in md
    assert "vs the dense baseline's fastest row" not in md  # a debug run has no ViT-H / ViT-L pair


def test_rows_timed_too_briefly_are_marked_and_make_no_claim(tmp_path, capsys):
    """`--warmup 1 --reps 2` gives numbers, but not ones to derive a speedup or a target from: the rows say why."""
    assert speedup.main(["--models", "debug", "--modes", "mae,mae_dense", "--ratios", "0.75", "--reps", "2",
                         "--warmup", "1", "--device", "cpu", "--batch", "4", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(r["status"] == "ok" and r["timing"].startswith("unstable: 1 warm-up step(s)")
               and "2 timed step(s), fewer than 5" in r["timing"] for r in data["rows"])
    assert data["speedups"] == []
    assert "left out of the speedups" in capsys.readouterr().err


def test_timing_verdict_names_each_reason():
    from benchmarks.sweep import timing_verdict

    assert timing_verdict(3, 10, 10.0, 11.0, True, 1.15) == "ok"
    assert timing_verdict(2, 10, 10.0, 11.0, False, 1.15) == "ok"
    assert timing_verdict(2, 10, 10.0, 11.0, True, 1.15) == ("unstable: 2 warm-up step(s), a compiled or captured "
                                                              "step needs 3")
    assert timing_verdict(3, 10, 10.0, 13.0, True, 1.15) == "unstable: p80/p20 1.30 > 1.15"


def test_best_and_else_rows_resolve_from_earlier_rows(monkeypatch):
    from benchmarks import step_runner as step

    def fake_run(self, *a, **k):
        if self.graphed is not None:
            raise RuntimeError("no capture here")
        ms = {"torch": 10.0, "auto": 5.0}[self.model.kernels]
        return step.StepStats(ms, 1.0, 1.0, 1.0, ms, ms, 5, 0.1)

    monkeypatch.setattr(step.StepRunner, "run", fake_run)
    plan = [("debug", "mae", 0.75, 2, "same", "reference"), ("debug", "mae", 0.75, 2, "same", "else:fast"),
            ("debug", "mae", 0.75, 2, "same", "fast+flash"), ("debug", "mae", 0.75, 2, "same", "else:triton"),
            ("debug", "mae_dense", 0.75, 2, "same", "best")]
    rows, _, _, _ = speedup.run_sweep(plan, torch.device("cpu"), 3, 5)
    assert [(r["mode"], r["config"], r["status"][:5]) for r in rows] == [
        ("mae", "reference", "ok"), ("mae", "fast+flash", "error"), ("mae", "triton", "ok"),
        ("mae_dense", "triton", "ok")]  # else:fast skipped after a success; best = the faster of the two


def test_lever_failure_is_a_row(monkeypatch, tmp_path):
    from benchmarks import step_runner as step

    def broken(self, *a, **k):
        raise RuntimeError("capture failed (simulated)")

    monkeypatch.setattr(step.StepRunner, "run", broken)
    assert speedup.main(["--models", "debug", "--modes", "mae", "--ratios", "0.75", "--device", "cpu",
                         "--config", "triton", "--batch", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert rows[0]["status"].startswith("error: RuntimeError: capture failed")


def test_merge_without_rows_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("")
    assert speedup.main(["--merge", str(tmp_path / "x.jsonl"), "--out", str(tmp_path)]) == 2
    assert "cannot merge" in capsys.readouterr().err
    assert speedup.main(["--merge", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2


def test_kernels_benchmark_cpu_smoke(tmp_path):
    from benchmarks import kernels

    assert kernels.main(["--shapes", "debug", "--impls", "eager", "--reps", "2", "--warmup", "1",
                         "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("kernels_cpu_*.json")).read_text())
    rows = data["rows"]
    assert {(r["op"], r["mode"]) for r in rows} == {(o, m) for o in ("masking", "unshuffle", "loss", "attention")
                                                   for m in ("fwd", "fwd+bwd")} | {("loss_accum", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["GB_per_s"] > 0 and r["timing"] == "cpu wall clock" for r in rows)
    for r in rows:  # GB/s is the op's minimum bytes over its time
        assert r["GB_per_s"] == pytest.approx(r["min_bytes"] / r["gpu_ms"] / 1e6, rel=1e-3)
    assert data["copy_GB_per_s"] is None  # no GPU: no roofline, no share of it claimed
    md = next(tmp_path.glob("kernels_cpu_*.md")).read_text()
    assert "CPU wall clock per call (no GPU figure)" in md and "pct_of_copy" not in md.split("| shape")[0]


def test_profile_writes_table_and_trace(tmp_path):
    from engine.cli import main

    code = main(["profile", "--preset", "debug", "--ratios", "0.75", "--steps", "2", "--warmup", "1", "--device",
                 "cpu", "--trace", str(tmp_path / "tr"), "--top", "5", "--out", str(tmp_path)])
    assert code == 0
    md = next(tmp_path.glob("profile_debug_cpu_*.md")).read_text()
    assert "Top 5 ops by self time" in md and "aten::" in md
    assert any((tmp_path / "tr").glob("trace_*.json"))
    assert "Time per step by kernel category" in md and "| matmul |" in md
    cats = next(tmp_path.glob("profile_debug_cpu_*_categories.csv")).read_text().splitlines()
    assert cats[0] == "config,mask_ratio,batch,category,ms_per_step,share_pct" and any(",matmul," in c for c in cats)


def test_profile_of_a_captured_lever_set(tmp_path):
    """A lever set with the CUDA graph has no forward / backward split: the profile still reports the step."""
    from engine.cli import main

    code = main(["profile", "--preset", "debug", "--ratios", "0.75", "--steps", "2", "--warmup", "1", "--device",
                 "cpu", "--config", "fast", "--batch", "8", "--out", str(tmp_path)])  # batch 8: test_agreement's
    # compiled blocks (one inductor cache entry for both)
    assert code == 0
    md = next(tmp_path.glob("profile_debug_cpu_*.md")).read_text()
    assert "| fast |" in md


def test_kernel_categories_of_h100_names():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profile import category_times, kernel_category

    names = {"nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "triton_tem_fused_addmm_gelu_0": "matmul",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3": "attention",
             "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<>": "attention",
             "triton_per_fused_add_native_layer_norm_backward_3": "layer norm",
             "triton_poi_fused_gelu_gelu_backward_5": "fused by the compile (Triton)",
             "void at::native::(anonymous namespace)::CatArrayBatchedCopy<>": "copy / cast / cat",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
             "_masking_fwd_kernel": "masking / unshuffle / loss (Triton)",
             "void at::native::reduce_kernel<512, 1>": "reduction"}
    for n, cat in names.items():
        assert kernel_category(n) == cat, n
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    evs = [SimpleNamespace(key="nvjet_a", device_type=cuda, self_device_time_total=3000.0),
           SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=3000.0),  # the same work, host op
           SimpleNamespace(key="Command Buffer Full", device_type=cuda, self_device_time_total=9000.0),
           SimpleNamespace(key="triton_poi_fused_add_1", device_type=cuda, self_device_time_total=1000.0)]
    rows = category_times(SimpleNamespace(key_averages=lambda: evs), torch.device("cuda"), steps=2)
    assert rows == [{"category": "matmul", "ms_per_step": 1.5, "share_pct": 75.0},
                    {"category": "fused by the compile (Triton)", "ms_per_step": 0.5, "share_pct": 25.0}]


def test_fsdp_benchmark_cpu_smoke(tmp_path):
    """In this process: the benchmark's one-process groups are torn down when it returns."""
    import torch.distributed as dist

    from benchmarks import fsdp

    assert fsdp.main(["--preset", "debug", "--batch", "8", "--memory-batches", "8", "--reps", "2", "--warmup", "1",
                      "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert not dist.is_initialized()
    md = next(tmp_path.glob("fsdp_cpu_*.md")).read_text()
    assert "FSDP2 cost vs the better single-device run" in md and "all-gather" in md
    data = json.loads(next(tmp_path.glob("fsdp_cpu_*.json")).read_text())
    assert [r["fsdp"] for r in data["comparison"]] == [False, True, False]
    assert all(r["status"] == "ok" for r in data["comparison"] + data["memory"])


def test_loader_benchmark_cpu_run_files_and_shards(tmp_path):
    """The loader benchmark's CPU run at small size (issue 17's CI row): DALI CPU and both torchvision transfers,
    from files and from shards it packs itself; labelled CPU, the GPU targets left unmeasured, not failed."""
    from benchmarks import loader
    from pipelines import dali_available

    backends = "torchvision-uint8,torchvision-float32" + (",dali-cpu" if dali_available() else "")
    assert loader.main(["--files", "24", "--sets", "imagenet", "--files-dir", str(tmp_path / "jpegs"),
                        "--backends", backends, "--batch", "8", "--workers", "1", "--img-size", "32",
                        "--batches", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("loader_cpu_*.json")).read_text())
    assert data["sets"]["imagenet"]["files"] == 24 and 80 < data["sets"]["imagenet"]["mean_kb"] < 150
    rows = data["loader"]
    assert {(r["source"], r["backend"]) for r in rows} == {(s, b) for s in ("files", "shards")
                                                           for b in backends.split(",")}
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 and r["output_dtype"] == "float32" for r in rows)
    assert (tmp_path / "jpegs" / "imagenet_500x375_24_shards" / "manifest.json").is_file()
    md = next(tmp_path.glob("loader_cpu_*.md")).read_text()
    assert "# Data loading (CPU:" in md and "**CPU figures**" in md
    assert [t["verdict"] for t in data["targets"]] == ["not measured (CPU run)"] * 3


def test_loader_targets_follow_from_the_rows():
    """Each target divides the right rows: DALI GPU over the strongest CPU loader (not the paper's float32 one),
    ViT-B fed by DALI over ViT-B synthetic (not ViT-L's)."""
    from benchmarks.loader import targets

    def row(backend, ips, source="files", set_="imagenet"):
        return {"backend": backend, "source": source, "set": set_, "status": "ok", "img_per_s": ips}

    rows = [row("dali-gpu", 15000.0), row("torchvision-uint8", 4000.0), row("torchvision-float32", 1500.0),
            row("dali-gpu", 9000.0, source="shards"), row("dali-gpu", 800.0, set_="large")]
    train = [{"preset": "mae_vit_base_patch16", "feed": "synthetic", "status": "ok", "img_per_s": 3600.0},
             {"preset": "mae_vit_base_patch16", "feed": "dali-gpu", "status": "ok", "img_per_s": 3500.0},
             {"preset": "mae_vit_large_patch16", "feed": "synthetic", "status": "ok", "img_per_s": 1000.0}]
    t = targets(rows, train, gpu=True)
    assert [x["value"] for x in t] == [15000.0, 3.75, 3500.0 / 3600.0]
    assert [x["verdict"] for x in t] == ["yes", "yes", "yes"]
    rows[1]["img_per_s"] = 6000.0
    train[1]["img_per_s"] = 3300.0
    assert [x["verdict"] for x in targets(rows, train, gpu=True)] == ["yes", "no", "no"]
    rows[0]["status"] = "error: x"
    assert targets(rows, train, gpu=True)[0]["verdict"] == "not measured"


def test_top_kernels_sorted_by_device_self_time():
    from types import SimpleNamespace

    from benchmarks.profile import top_kernels

    evs = [SimpleNamespace(key="small", count=1, self_device_time_total=10.0),
           SimpleNamespace(key="big", count=2, self_device_time_total=5000.0),
           SimpleNamespace(key="host-only", count=3, self_device_time_total=0.0)]

    class FakeAvgs(list):
        def table(self, sort_by, row_limit):
            return "table"

    prof = SimpleNamespace(key_averages=lambda: FakeAvgs(evs))
    _, rows = top_kernels(prof, torch.device("cuda"), 2)
    assert [r["name"] for r in rows] == ["big", "small"] and rows[0]["self_ms_total"] == 5.0


def test_every_lever_set_runs_a_step_with_the_reference_loss(stand_in_apex):
    """Each lever set of `mae bench speedup` builds and steps (compile left out here: tests/test_parallel.py
    holds the compiled blocks to eager; apex is conftest's stand-in); the first step's loss is the reference way's."""
    from benchmarks.step_runner import StepRunner
    from engine.config import debug

    m = debug().model
    losses = {}
    for name, levers in speedup.CONFIGS.items():
        if levers.get("optimizer") == "apex":  # apex's FusedAdam is CUDA-only: refused with its reason
            with pytest.raises(RuntimeError, match="optim.fused=apex"):
                StepRunner(m, "mae", 4, "cpu", **dict(levers, compile="none"))
            continue
        r = StepRunner(m, "mae", 4, "cpu", **dict(levers, compile="none"))
        losses[name] = r.step().item()
        if levers.get("attention") == "encoder-math":
            assert not any(b.attn.fused_attn for b in r.model.blocks), name
        if levers.get("layer_norm") == "apex":
            assert isinstance(r.model.blocks[0].norm1, stand_in_apex), name
        if levers.get("precision") == "fp8":
            from engine.fp8 import fp8_layers

            assert len(fp8_layers(r.model)) == 4 * m.depth, name
        if levers.get("checkpoint_blocks"):  # a ViT-H-sized lever set on the debug model: all of its blocks
            assert r.model.checkpoint_first == min(levers["checkpoint_blocks"], m.depth), name
        if levers.get("checkpoint_decoder_blocks"):
            assert r.model.checkpoint_first_decoder == min(levers["checkpoint_decoder_blocks"], m.decoder_depth), name
    for name, loss in losses.items():
        tol = 2e-2 if speedup.CONFIGS[name].get("precision") in ("bf16-pure", "fp8") else 1e-5
        assert abs(loss - losses["reference"]) <= tol * losses["reference"], (name, loss, losses["reference"])


def test_speedup_target_pairs_with_the_fastest_dense_row():
    """A lever that slows the dense baseline does not inflate the same-batch speedup target."""
    from engine.config import get_preset

    def row(mode, config, ips):
        return {"model": "vit-h", "mode": mode, "mask_ratio": 0.75, "batch": 128, "config": config, "status": "ok",
                "img_per_s": ips, "batch_kind": "same", "first_step_s": 10.0}

    rows = [row("mae", "fast", 1200.0), row("mae_dense", "fast", 400.0), row("mae", "fast+encmath", 1300.0),
            row("mae_dense", "fast+encmath", 350.0)]
    sp = speedup.speedup_rows(rows, {"vit-h": get_preset("vit-h").model})
    by = {x["config"]: x for x in sp}
    assert by["fast+encmath"]["speedup_vs_dense"] == round(1300 / 350, 3)  # same levers: 3.714
    assert by["fast+encmath"]["speedup_vs_best_dense"] == 3.25 and by["fast+encmath"]["best_dense_config"] == "fast"
    line = next(x for x in speedup_report.target_lines(rows, sp) if x.startswith("| vit-h speedup"))
    assert "| 3.25 | gap 0.05 |" in line and "fast+encmath vs the dense baseline's fastest row, fast" in line


@pytest.mark.parametrize("args", [("debug", True, True, "encoder-math", 1, "default", "cpu", 1),
                                  ("debug", False, True, "encoder-math", 0), ("debug", False, True, "encoder-triton", 0),
                                  ("debug", False, False, "auto", 2, "default", "cpu", 1)])
def test_graph_step_check_set_up_runs_on_cpu(args):
    """The CUDA check of the captured step, with both bodies eager on CPU: the set-up of each new lever path
    (encoder-math, compile, bf16-pure, partial checkpointing of encoder and decoder, a NaN step) runs, and two
    identical eager bodies agree exactly. One case compiles (every lever at once: a compile per case cost the
    suite 30-50 s each on an empty inductor cache)."""
    from benchmarks.cuda_checks import check_graph_step

    kw = {} if len(args) > 5 else {"device": "cpu"}
    assert check_graph_step(*args, **kw) == 0.0


def test_claims_pair_with_the_strongest_baseline_of_the_same_run():
    """The fast path is held to the faster of the paper's code eager and compiled whole, and to the faster dense
    ViT, of the same run and batch; unstable rows and other runs never enter; a warm compile never stands in for
    the cold time to first step."""
    from engine.config import get_preset

    def row(mode, config, ips, ratio=0.75, run=1, batch=256, **kw):
        return {"model": "vit-h", "mode": mode, "mask_ratio": ratio, "batch": batch, "config": config, "status": "ok",
                "img_per_s": ips, "batch_kind": "same", "first_step_s": 10.0, "run": run, **kw}

    rows = [row("mae", "fast", 1280.0, compile_cache="warm"), row("mae", "reference", 1040.0),
            row("mae", "reference+compile", 1200.0, compile_cache="cold", first_step_s=118.0),
            row("mae", "reference+compile", 1500.0, run=2),  # another machine: not this run's baseline
            row("mae", "reference+compile", 1600.0, timing="unstable: p80/p20 1.40 > 1.15"),
            row("vit", "reference", 330.0, ratio=None), row("vit", "reference+compile", 400.0, ratio=None)]
    sp = speedup.speedup_rows(rows, {"vit-h": get_preset("vit-h").model})
    fast = next(x for x in sp if x["config"] == "fast" and x["run"] == 1)
    assert fast["strongest_reference"] == "reference+compile" and fast["speedup_vs_strongest_reference"] == round(
        1280 / 1200, 3)
    assert fast["vit_config"] == "reference+compile" and fast["speedup_vs_vit"] == round(1280 / 400, 3)
    assert all("speedup_vs_strongest_reference" not in x for x in sp if x["config"] in REFERENCE_CONFIGS)
    lines = "\n".join(speedup_report.target_lines(rows, sp))
    assert "fast 1280 vs reference+compile 1200 img/s" in lines and "| 1.067 | gap" in lines
    assert "cold compile cache, s (build + compile + first step) (reference+compile, batch 256) | 30 | 118" in lines


def test_reports_go_to_the_working_directory_not_the_package(tmp_path, monkeypatch):
    """Without --out a benchmark writes ./bench-results/ where it is run, never into the installed package."""
    import benchmarks

    monkeypatch.chdir(tmp_path)
    pkg = Path(benchmarks.__file__).resolve().parent
    before = set((pkg / "results").iterdir())
    assert speedup.main(["--models", "debug", "--modes", "mae", "--ratios", "0.75", "--reps", "2", "--warmup", "1",
                         "--device", "cpu"]) == 0
    assert list((tmp_path / "bench-results").glob("speedup_cpu_*.md"))
    assert set((pkg / "results").iterdir()) == before


def test_loader_fed_training_rows_run(tmp_path):
    """The fed-training rows' code path on a CPU (debug preset, reference levers): a loader's stream drives the
    trainer's step, as does synthetic input; DALI's CPU output is moved to the step's device."""
    from benchmarks import loader
    from pipelines import dali_available

    files, _ = loader.make_jpeg_set(tmp_path / "j", 16, 1, (64, 48))
    feeds = ["synthetic", "torchvision-uint8"] + (["dali-cpu"] if dali_available() else [])
    rows = [loader.time_training(f, str(tmp_path / "j"), "debug", 4, 1, torch.device("cpu"), 2, "reference",
                                 n_files=len(files)) for f in feeds]
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 for r in rows), rows
    bad = loader.time_training("torchvision-uint8", str(tmp_path / "missing"), "debug", 4, 1, torch.device("cpu"),
                               2, "reference")
    assert bad["status"].startswith("error: DataError") and "missing" in bad["status"]


def test_scaling_model_bytes_and_report(tmp_path):
    """Ring collective volumes: FSDP2 over N ranks moves 8P (N-1)/N bytes per rank (bf16 all-gather twice, fp32
    reduce-scatter); HSDP keeps that inside a node and sends only the fp32 gradient shard's all-reduce across."""
    from benchmarks import scaling

    P = 1_000_000
    b = scaling.collective_bytes(P, 64, 64)
    assert b["all_gather"] == pytest.approx(4 * P * 63 / 64) and b["reduce_scatter"] == pytest.approx(4 * P * 63 / 64)
    assert b["all_reduce_across"] == 0
    h = scaling.collective_bytes(P, 64, 8)
    assert h["all_gather"] == pytest.approx(4 * P * 7 / 8)
    assert h["all_reduce_across"] == pytest.approx(2 * (4 * P / 8) * 7 / 8)
    f = scaling.model_row("FSDP2", 64, 8, P * 600, 40, 0.05, 64, 450e9, 50e9, 0.8, 0.8)
    hs = scaling.model_row("HSDP", 64, 8, P * 600, 40, 0.05, 64, 450e9, 50e9, 0.8, 0.8)
    assert hs["gb_across"] < f["gb_across"] / 7 and hs["efficiency"] > f["efficiency"]
    assert f["img_per_s"] == round(64 * 64 / (f["step_ms"] / 1000), -1) or abs(
        f["img_per_s"] - 64 * 64 / (f["step_ms"] / 1000)) < 0.01 * f["img_per_s"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"environment": {"device": "GPU X"}}) + "\n" + json.dumps({"row": {
        "model": "vit-b", "mode": "mae", "mask_ratio": 0.75, "batch": 128, "config": "triton+compile",
        "status": "ok", "img_per_s": 3000.0, "step_ms": 42.7}}) + "\n")
    assert scaling.main(["--rows", str(rows), "--model", "vit-b", "--out", str(tmp_path), "--bytes", "formula"]) == 0
    md = next(tmp_path.glob("scaling_vit-b_*.md")).read_text()
    assert "Computed, not measured" in md and "on GPU X" in md and "| 128 | HSDP | 1024 |" in md
    assert "from the formula above" in md
    assert scaling.main(["--rows", str(rows), "--model", "vit-h", "--out", str(tmp_path)]) == 2


def test_scaling_takes_its_bytes_from_the_rehearsals_count():
    """--bytes counted: FSDP2 over 8 ranks and HSDP 8 x 8 of the debug model, from the dry run's count: the
    formula's volumes plus FSDP2's dim-0 padding, with the ring fractions."""
    import torch

    from benchmarks import scaling
    from engine.config import get_preset
    from engine.model import build_model

    with torch.device("meta"):
        m = build_model(get_preset("debug").model)

    def padded(shard, trainable=False):
        return sum(-(-p.shape[0] // shard) * shard * (p.numel() // p.shape[0]) for p in m.parameters()
                   if p.requires_grad or not trainable)

    cache = {}
    f = scaling.counted_bytes("debug", 8, 8, cache)
    assert f["all_gather"] == pytest.approx(2 * 2 * padded(8) * 7 / 8)
    assert f["reduce_scatter"] == pytest.approx(4 * padded(8, True) * 7 / 8) and f["all_reduce_across"] == 0
    h = scaling.counted_bytes("debug", 64, 8, cache)
    assert h["all_gather"] == f["all_gather"]  # the shard group is the same
    assert h["all_reduce_across"] == pytest.approx(2 * (4 * padded(8, True) / 8) * 7 / 8)
    assert len(cache) == 2 and scaling.counted_bytes("debug", 256, 8, cache)["all_gather"] == f["all_gather"]
    assert len(cache) == 2  # one rehearsal per shard group, whatever the number of replicas
