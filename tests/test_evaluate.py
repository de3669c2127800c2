import pytest
import timm
import torch

from engine import checkpoint as ckpt
from engine import evaluate as ev
from engine.config import debug
from engine.model import build_model, mae_vit_base_patch16


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pipelines.labelled import export_digits

    root = tmp_path_factory.mktemp("digits")
    export_digits(str(root), 32)
    return root


def small_mae():
    return build_model(debug().model)


def test_linear_probe_head_is_bn_without_affine_and_encoder_frozen():
    m = ev.EncoderClassifier(small_mae(), 10, pool="cls", head="bn_linear")
    m.freeze_all_but_last(0)
    bn = m.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}


def test_partial_finetune_trains_last_k_blocks_only():
    m = ev.EncoderClassifier(small_mae(), 10, pool="gap", head="linear")
    m.freeze_all_but_last(1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("blocks.1.") for n in trainable)
    assert not any(n.startswith("blocks.0.") or n.startswith("patch_embed") for n in trainable)
    assert {"fc_norm.weight", "head.weight"} <= trainable


def test_pooling_choices():
    mae = small_mae()
    x = torch.randn(2, 3, 32, 32)
    cls = ev.EncoderClassifier(mae, 10, pool="cls").eval()
    gap = ev.EncoderClassifier(mae, 10, pool="gap").eval()
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x, 0.0, torch.arange(64.0).expand(2, -1) / 64)
        assert torch.allclose(cls.features(x), latent[:, 0], atol=1e-5)
        assert gap.features(x).shape == (2, 64)


class PaperLARS(torch.optim.Optimizer):
    """The paper's LARS (its util/lars.py), transcribed: the reference timm's Lars is held to."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0.0, torch.where(un > 0, g["trust_coefficient"] * pn / un, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def test_lars_is_the_papers_bit_for_bit():
    """The linear probe's optimizer (timm's Lars, configured by ev.lars) against the paper's LARS: same parameters
    after several steps, bit for bit, matrices with the trust ratio and vectors as plain momentum SGD."""
    def params():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(32, 16, generator=g).requires_grad_(), torch.randn(16, generator=g).requires_grad_(),
                torch.zeros(10, 32).requires_grad_()]  # an all-zero matrix: the trust ratio falls back to 1

    pa, pb = params(), params()
    oa, ob = PaperLARS(pa, lr=0.5), ev.lars(pb, lr=0.5)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in pa]
        for pp in (pa, pb):
            for p, gr in zip(pp, grads):
                p.grad = gr.clone()
        oa.step()
        ob.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    # the exclusions: a vector moved as momentum SGD (no trust ratio), a matrix by the trust ratio
    w, b = torch.nn.Parameter(torch.full((2, 2), 2.0)), torch.nn.Parameter(torch.ones(2))
    w.grad, b.grad = torch.full((2, 2), 0.5), torch.full((2,), 0.5)
    ev.lars([w, b], lr=1.0).step()
    assert torch.allclose(w, torch.full((2, 2), 2.0 - 0.001 * 4.0 / 1.0 * 0.5))
    assert torch.allclose(b, torch.full((2,), 0.5))


def _paper_layer_decay(model, weight_decay, layer_decay, no_decay=("cls_token", "pos_embed")):
    """The paper's param_groups_lrd (util/lr_decay.py), transcribed: {name: (lr_scale, weight_decay)}."""
    num_layers = len(model.blocks) + 1
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in no_decay)
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks"):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = num_layers
        out[name] = (layer_decay ** (num_layers - layer), weight_decay if decay else 0.0)
    return out


@pytest.mark.parametrize("last_blocks", [None, 1])
def test_layer_decay_groups_are_the_papers(last_blocks):
    m = ev.EncoderClassifier(small_mae(), 10, pool="gap", head="linear")
    if last_blocks is not None:
        m.freeze_all_but_last(last_blocks)
    groups = ev.layer_decay_groups(m, 0.05, 0.75)
    scale = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert scale == _paper_layer_decay(m, 0.05, 0.75)
    if last_blocks is None:
        assert scale["patch_embed.proj.weight"] == (0.75**3, 0.05) and scale["head.weight"] == (1.0, 0.05)
        assert scale["blocks.0.norm1.weight"][1] == 0.0 and scale["cls_token"] == (0.75**3, 0.0)


def test_the_written_out_schedules_equal_timms_cosine_with_warm_up():
    """lr_at (pretraining, per step) and lr_at_epoch (evaluation) are kept as pure functions of the position (resume,
    the captured step's tensor lr); they are timm's CosineLRScheduler (warm-up prefix, from 0) to rounding."""
    from timm.scheduler import CosineLRScheduler

    from engine.optim import lr_at

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    total, warm = 100, 10
    sched = CosineLRScheduler(opt, t_initial=total - warm, lr_min=0.1, warmup_t=warm, warmup_lr_init=0.0,
                              warmup_prefix=True, t_in_epochs=False)
    for step in range(total + 1):
        want = sched._get_lr(step)[0]
        assert lr_at(step, total, warm, 2.0, 0.1) == pytest.approx(want, rel=1e-12, abs=1e-15), step
        assert ev.lr_at_epoch(step / 10, total / 10, warm / 10, 2.0, 0.1) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_knn_classify_votes_by_weighted_cosine():
    train = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    y = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert torch.equal(ev.knn_classify(train, y, test, 2, k=3), torch.tensor([0, 1]))
    # with k = 5 the majority would say class 1 for the first, but the temperature weights keep class 0
    assert ev.knn_classify(train, y, test[:1], 2, k=5, temperature=0.07).item() == 0


def test_protocols_run_on_digits(digits):
    from engine.config import DataConfig
    from pipelines.labelled import LabelledLoader

    d = DataConfig(num_workers=0)
    tr = LabelledLoader(str(digits / "train"), 32, 128, d, 0, "cpu", train=True)
    va = LabelledLoader(str(digits / "val"), 32, 256, d, 0, "cpu", train=False)
    assert tr.num_classes == 10
    mae = small_mae()
    r = ev.knn_eval(mae, LabelledLoader(str(digits / "train"), 32, 256, d, 0, "cpu", train=False), va, "cpu")
    assert 0.3 < r.top1 <= 1.0  # random features on digits are far above chance already
    r = ev.linear_probe(mae, tr, va, torch.device("cpu"), epochs=5, base_lr=40, batch_size=128, pool="gap",
                        log=lambda *_: None)
    # 10 classes: chance is 10%; a probe that trains its head on frozen random features reaches ~29% in 5 epochs
    assert r.top1 > 0.2 and len(r.history) == 5
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    r = ev.finetune(mae, tr, va, torch.device("cpu"), epochs=1, batch_size=128, last_blocks=1, log=lambda *_: None)
    after = mae.state_dict()
    assert torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert not torch.equal(before["blocks.1.attn.qkv.weight"], after["blocks.1.attn.qkv.weight"])


# ----------------------------------------------------------------------------------------------------------
# checkpoints in and out


def test_round_trip_ours_paper_ours_is_lossless(tmp_path):
    m = small_mae()
    paper = ckpt.to_reference_format(m.state_dict())
    torch.save(paper, tmp_path / "paper.pth")
    m2 = build_model(debug().model)
    m2.init_weights(seed=5)
    info = ckpt.import_weights(m2, tmp_path / "paper.pth")
    assert info["format"] == "mae" and not info["kept_init"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_round_trip_key_set_vit_b():
    with torch.device("meta"):
        m = mae_vit_base_patch16()
    paper = ckpt.to_reference_format(m.state_dict())
    assert set(paper["model"]) == set(m.state_dict()) and ckpt.detect_format(paper["model"]) == "mae"


def test_import_timm_weights_encoder_only(tmp_path):
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, pretrained=False, img_size=32, patch_size=4,
                            embed_dim=64, depth=2, num_heads=4)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    m = small_mae()
    dec_before = m.decoder_pred.weight.clone()
    info = ckpt.import_weights(m, tmp_path / "vit.safetensors")
    assert info["format"] == "timm"
    assert torch.equal(m.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(m.decoder_pred.weight, dec_before) and "decoder_pred.weight" in info["kept_init"]


def test_import_paper_finetuned_checkpoint(tmp_path):
    m = small_mae()
    enc = ckpt.encoder_state_dict(m.state_dict())
    ft = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    ft.update({"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64), "head.weight": torch.zeros(10, 64),
               "head.bias": torch.zeros(10)})
    torch.save({"model": ft}, tmp_path / "ft.pth")
    m2 = small_mae()
    m2.init_weights(seed=3)
    info = ckpt.import_weights(m2, tmp_path / "ft.pth")
    assert info["format"] == "finetuned" and "norm.weight" in info["kept_init"]
    assert torch.equal(m2.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)


def test_import_mismatch_lists_keys_and_shapes(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False, img_size=64, patch_size=8,
                            embed_dim=64, depth=3, num_heads=4)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.import_weights(small_mae(), tmp_path / "vit.pth")
    msg = str(e.value)
    assert "unexpected (12): blocks.2." in msg and "shape mismatch (1): patch_embed.proj.weight" in msg
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ckpt.CheckpointError, match="not an MAE"):
        ckpt.import_weights(small_mae(), tmp_path / "junk.pth")


def test_mae_import_and_visualize_paper_checkpoint(tmp_path, capsys):
    from PIL import Image

    from engine.cli import main

    m = small_mae()
    torch.save(ckpt.to_reference_format(m.state_dict()), tmp_path / "mae_pretrain_debug.pth")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "a.png")
    # the paper's files carry no config: --preset names the architecture
    assert main(["visualize", str(tmp_path / "mae_pretrain_debug.pth"), str(tmp_path / "a.png"), "--preset", "debug",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert main(["import", str(tmp_path / "mae_pretrain_debug.pth"), "--preset", "debug", "--out",
                 str(tmp_path / "ours.pt")]) == 0
    assert main(["visualize", str(tmp_path / "ours.pt"), str(tmp_path / "a.png"), "--out", str(tmp_path / "h.png")]) == 0
    assert main(["visualize", str(tmp_path / "mae_pretrain_debug.pth"), str(tmp_path / "a.png")]) == 2
    assert "carries no config" in capsys.readouterr().err


def test_ablation_sweep_writes_table_and_plot(digits, tmp_path):

    from engine.cli import main

    out = tmp_path / "abl"
    code = main(["ablate", "--preset", "debug", "--data", str(digits / "train"), "--probe-train",
                 str(digits / "train"), "--probe-val", str(digits / "val"), "--mask-ratio", "0.5",
                 "--mask-strategy", "grid", "--decoder-width", "64", "--train.max_steps", "4", "--workers", "0",
                 "--data.num_workers", "0", "--train.tensorboard", "false", "--train.device", "cpu",
                 "--data.backend", "torchvision", "--out", str(out)])
    assert code == 0
    import csv

    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [r["setting"] for r in rows] == ["r0.75_dd1_dw32_random", "r0.5_dd1_dw32_random",
                                           "r0.75_dd1_dw64_random", "r0.75_dd1_dw32_grid"]
    assert all(0 < float(r["knn_top1"]) <= 1 and float(r["final_loss"]) > 0 for r in rows)
    assert (out / "ablation.png").is_file() and "knn_top1" in (out / "ablation.md").read_text()


def test_knn_monitor_during_pretraining(digits, tmp_path):
    import json as _json

    from conftest import debug_cfg
    from engine.config import ConfigError
    from engine.trainer import Trainer

    with pytest.raises(ConfigError, match="knn_every needs data.knn_train"):
        Trainer(debug_cfg(tmp_path / "x", **{"train.knn_every": 1}))
    cfg = debug_cfg(tmp_path / "r", **{"train.knn_every": 1, "data.knn_train": str(digits / "train"),
                                       "data.knn_val": str(digits / "val"), "train.max_steps": 8,
                                       "data.repeat": 1, "data.path": str(digits / "val"),
                                       "train.batch_size": 64})
    t = Trainer(cfg)
    assert t.steps_per_epoch == 8  # 539 images / 64
    t.fit()
    recs = [_json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "knn_top1" in r] == [8]


def test_demonstration_pretrained_beats_random(digits, tmp_path, seed=0):
    """The README's demonstration at CI size: 20 epochs of the debug preset on the digits, then kNN (one seed in CI:
    the margin, +20 to +27 points over seeds 0-2, is twice the bound)."""
    import json as _json

    from engine.cli import main

    run = tmp_path / "run"
    common = ["--data.backend", "torchvision", "--train.device", "cpu", "--train.tensorboard", "false"]
    assert main(["pretrain", "--preset", "debug", "--data", str(digits / "train"), "--run-dir", str(run),
                 "--train.epochs", "20", "--train.seed", str(seed), "--train.log_every", "100",
                 "--train.vis_every", "0", *common]) == 0
    ck = str(sorted(run.glob("ckpt_*.pt"))[-1])
    acc = {}
    for name, src in (("pretrained", ["--checkpoint", ck]), ("random", ["--random", "--preset", "debug"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "knn", *src, "--train", str(digits / "train"), "--val", str(digits / "val"),
                     "--workers", "0", "--seed", str(seed), "--out", str(out), "--train.device", "cpu"]) == 0
        acc[name] = _json.loads(out.read_text())["top1"]
    assert acc["pretrained"] > acc["random"] + 0.10, acc  # measured: +20 to +27 points over seeds 0-2


def test_a_short_evaluation_clamps_its_warm_up_and_says_so():
    logs = []
    assert ev.fit_warmup(10, 3, 9, "linprobe", logs.append) == 1.5
    assert "a warm-up of 10 epochs does not fit a 3-epoch run; using 1.5" in logs[0]
    assert "27 optimizer steps in all" in logs[1] and "--epochs 20 --lr 40" in logs[1]
    logs.clear()
    assert ev.fit_warmup(10, 90, 5000, "linprobe", logs.append) == 10 and logs == []
