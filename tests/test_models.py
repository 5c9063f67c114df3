"""model.py's torchvision backbones (--arch), freeze stages, layer-decay groups, gradient
checkpointing, one-channel stem, torchxrayvision weights, the three-class head, float32 heads under
autocast and older checkpoints. Each arch is built once per module, at 32 px. timm backbones:
test_timm.py."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import make_submission
import train
from model import compute_loss, masked_cross_entropy, masked_mse
from common import UserError

from model import (ARCHS, CHECKPOINT_FORMAT, IMAGE_MEAN, IMAGE_STD, N_STAGES, Checkpoint, backbone_stages, build_model,
                   load_checkpoint, model_config, n_stages, param_groups, set_frozen, set_grad_checkpointing)
from weights import XRV_MEAN, XRV_STD, load_pretrained

NAMES = ["Cardiomegaly", "Fracture"]


@pytest.fixture(scope="module")
def models():
    """arch -> a random-init regression model for NAMES with small heads, built on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = build_model(model_config(NAMES, hidden=8, arch=arch))
        return cache[arch]
    return get


def images(n=2, size=32, seed=0):
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def leaves(module):
    return [m for m in module.modules() if not list(m.children())]


# ---------------------------------------------------------------------------------------------
# every arch: shapes, ranges, stages

@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_gives_k_outputs_in_range_through_its_feature_map(models, arch):
    model = models(arch).eval()
    x = images(3)
    with torch.no_grad():
        out, fmap = model(x), model.feature_map(x)
        via_map = model.from_feature_map(fmap)
    assert out.shape == (3, 2) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    assert fmap.dim() == 4 and fmap.shape[:2] == (3, ARCHS[arch][1])
    assert torch.equal(out, via_map)  # forward = heads(pool(feature_map)), so Grad-CAM can hook the map
    assert model.backbone.get_submodule(model.stem).in_channels == 1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_set_frozen_freezes_exactly_the_first_n_stages(models, arch):
    model = models(arch)
    stages = backbone_stages(model.family, model.backbone)
    sizes = [n_params(s) for s in stages]
    assert n_stages(model) == len(stages) == N_STAGES and all(sizes)
    assert sum(sizes) == n_params(model.backbone)  # the stages cover the backbone, without overlap
    assert [len(g) for g in model.groups()] == [len(list(s.parameters())) for s in stages]
    for n in range(N_STAGES + 1):
        set_frozen(model, n)
        model.train()
        assert n_params(model, trainable_only=True) == n_params(model) - sum(sizes[:n]), n
        assert all(not m.training for s in stages[:n] for m in leaves(s))  # frozen BatchNorm keeps its statistics
        assert all(m.training for s in stages[n:] for m in leaves(s))
    assert n_params(model, trainable_only=True) == n_params(model.heads)  # --freeze 5: only the heads train
    set_frozen(model, 0)
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())


def test_layer_decay_scales_the_five_stages_from_the_heads_down(models):
    model = models("resnet18")
    groups = param_groups(model, weight_decay=1e-4, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(scale) == len(list(model.parameters()))  # each once
    assert [g["lr_scale"] for g in groups] == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]  # heads first
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    b = model.backbone
    assert scale[id(model.heads[1][3].weight)] == 1.0 and scale[id(b.layer4[1].conv2.weight)] == 0.5
    assert scale[id(b.layer1[0].bn1.bias)] == 0.5 ** 4 and scale[id(b.conv1.weight)] == scale[id(b.bn1.weight)] == 0.5 ** 5
    (off,) = param_groups(model, weight_decay=1e-4)  # --layer-decay 1: today's single group
    assert off["lr_scale"] == 1.0 and [id(p) for p in off["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("arch", list(ARCHS))  # the ResNet steps; the children of `features` (DenseNet's stem as one)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(models, arch):
    model = models(arch).train()  # training mode: BatchNorm uses batch statistics, so both passes agree
    results = []
    for enable in (False, True):
        set_grad_checkpointing(model, enable)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout and stochastic-depth draws
        out = model(images(2))
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    set_grad_checkpointing(model, False)
    model.zero_grad(set_to_none=True)
    (out, grads), (out_ckpt, grads_ckpt) = results
    assert torch.allclose(out, out_ckpt, atol=1e-6) and grads.keys() == grads_ckpt.keys() and grads
    assert all(torch.allclose(grads[n], grads_ckpt[n], atol=1e-5) for n in grads)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pretrained_torchvision_weights_load_with_the_stem_summed_over_colour(models, arch, tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.get_model(arch, weights=None)
    ref = reference.state_dict()
    torch.save(ref, tmp_path / "w.pth")
    model = models(arch)
    assert load_pretrained(model, str(tmp_path / "w.pth")) == {"source": "torchvision", "mean": IMAGE_MEAN, "std": IMAGE_STD}
    got = model.backbone.state_dict()
    stem = model.stem + ".weight"
    assert ref[stem].shape[1] == 3 and torch.equal(got[stem], ref[stem].sum(dim=1, keepdim=True))
    deep = [k for k in got if k.endswith("weight") and k != stem][-1]
    assert torch.equal(got[deep], ref[deep])


def test_imagenet_densenet_weights_with_old_key_names_load(models, monkeypatch):
    """torchvision's DenseNet ImageNet file names layers 'norm.1', which its own loader renames."""
    torch.manual_seed(2)
    ref = torchvision.models.densenet121(weights=None).state_dict()
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2") if "denselayer" in k else k: v for k, v in ref.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    monkeypatch.setattr(torchvision.models.DenseNet121_Weights, "get_state_dict", lambda self, *a, **k: dict(old))
    model = models("densenet121")
    assert load_pretrained(model, "imagenet")["source"] == "imagenet"
    key = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(model.backbone.state_dict()[key], ref[key])


def test_imagenet_weights_offline_name_the_arch_file_and_the_alternatives(models, monkeypatch):
    def offline(self, *a, **k):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.models.ConvNeXt_Tiny_Weights, "get_state_dict", offline)
    with pytest.raises(UserError, match=r"^could not download the ImageNet ConvNeXt-Tiny weights .*--weights PATH "
                                        r"with a local copy of convnext_tiny-983f1562.pth, or --weights none$"):
        load_pretrained(models("convnext_tiny"), "imagenet")


# ---------------------------------------------------------------------------------------------
# torchxrayvision weights: state dicts laid out as xrv.models.DenseNet / xrv.models.ResNet save them

def xrv_densenet_state(seed=3) -> dict:
    """xrv.models.DenseNet(weights='densenet121-res224-all').state_dict(): torchvision's densenet121
    names, a one-channel conv0, an 18-way classifier and the op_threshs buffer."""
    torch.manual_seed(seed)
    state = torchvision.models.densenet121(weights=None, num_classes=18).state_dict()
    state["features.conv0.weight"] = torch.randn(64, 1, 7, 7)
    state["op_threshs"] = torch.rand(18)
    return state


def xrv_resnet_release_state(seed=4) -> dict:
    """resnet50-res512-all's release file (pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt): the
    state dict of torchvision's resnet50 with a one-channel conv1 and an 18-way fc."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet50(weights=None, num_classes=18).state_dict()
    state["conv1.weight"] = torch.randn(64, 1, 7, 7)
    return state


def test_xrv_densenet_weights_train_with_their_input_scale(demo_root, tiny_args, tmp_path):
    """Through train.py: --freeze 5 keeps the backbone as loaded for the one epoch, so the checkpoint
    must hold xrv's tensors, and its model config xrv's normalisation."""
    state = xrv_densenet_state()
    torch.save(state, tmp_path / "densenet121-res224-all.pt")
    train.main(tiny_args("--pathology", "Cardiomegaly", "--arch", "densenet121", "--freeze", "5",
                         "--weights", str(tmp_path / "densenet121-res224-all.pt")))
    model, ckpt = load_checkpoint(tmp_path / "ckpt" / "cardiomegaly" / "best.pt")
    got = model.backbone.state_dict()
    for key in ("features.conv0.weight", "features.denseblock3.denselayer7.conv1.weight"):
        assert torch.equal(got[key], state[key]), key
    assert ckpt.model_config["arch"] == "densenet121"
    assert (ckpt.model_config["mean"], ckpt.model_config["std"]) == (XRV_MEAN, XRV_STD) == (0.5, 0.5 / 1024)
    assert (float(model.mean), float(model.std)) == (XRV_MEAN, XRV_STD)
    assert (ckpt.preprocess["mean"], ckpt.preprocess["std"]) == (XRV_MEAN, XRV_STD)  # recorded as used
    x = torch.tensor([0, 255], dtype=torch.uint8)
    assert ((x.float() / 255 - model.mean) / model.std).tolist() == [-1024.0, 1024.0]  # xrv's [-1024, 1024]


@pytest.mark.parametrize("layout", ["release file", "xrv.models.ResNet state_dict"])
def test_xrv_resnet50_weights_load_in_either_layout(models, tmp_path, layout):
    state = xrv_resnet_release_state()
    saved = state if layout == "release file" else {**{"model." + k: v for k, v in state.items()},
                                                    "op_threshs": torch.rand(18)}
    torch.save(saved, tmp_path / "w.pt")
    model = models("resnet50")
    assert load_pretrained(model, str(tmp_path / "w.pt")) == {"source": "torchxrayvision", "mean": XRV_MEAN, "std": XRV_STD}
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert (model.config["mean"], model.config["std"]) == (XRV_MEAN, XRV_STD) and float(model.std) == XRV_STD
    load_pretrained(model, "none")
    assert model.config["mean"] == XRV_MEAN  # 'none' leaves the normalisation alone


def test_weights_of_an_unknown_layout_or_the_wrong_arch_are_one_line_errors(models, tmp_path):
    torch.save(xrv_densenet_state(), tmp_path / "dn.pt")
    with pytest.raises(UserError, match=r"dn.pt: torchxrayvision DenseNet-121 weights; use --arch densenet121$"):
        load_pretrained(models("resnet18"), str(tmp_path / "dn.pt"))
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "odd.pt")
    with pytest.raises(UserError) as e:
        load_pretrained(models("resnet18"), str(tmp_path / "odd.pt"))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"--weights {tmp_path / 'odd.pt'}: not a ResNet-18 backbone (expected torchvision's "
                                   "resnet18 state dict, torchxrayvision's densenet121-res224-all or resnet50-res512-all")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled model, as xrv's DenseNet releases are
    with pytest.raises(UserError, match=r"module.pt: not a loadable state dict .*save their state_dict\(\) first"):
        load_pretrained(models("resnet18"), str(tmp_path / "module.pt"))


# ---------------------------------------------------------------------------------------------
# the three-class head

def test_three_class_score_is_p_positive_minus_p_negative():
    model = build_model(model_config(NAMES, hidden=8, arch="resnet18", head_type="three-class")).eval()
    with torch.no_grad():
        out = model(images(4))
    assert out.shape == (4, 2, 3) and out.dtype == torch.float32
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]], [[5.0, -5.0, -5.0], [-9.0, 9.0, -9.0]]])
    score = model.score(logits)
    p = torch.softmax(logits, -1)
    assert torch.allclose(score, p[..., 2] - p[..., 0])
    assert score[0].tolist() == pytest.approx([0.0, 0.25]) and score[1, 0] < -0.99 and abs(score[1, 1]) < 1e-6
    regression = build_model(model_config(NAMES, hidden=8, arch="resnet18"))
    assert regression.score(out[..., 0]) is not None and torch.equal(regression.score(out[..., 0]), out[..., 0])


def test_masked_cross_entropy_ignores_masked_entries():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 3, requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, -1.0], [-1.0, 1.0], [float("nan"), 0.0]])
    mask = ~torch.isnan(target)
    loss = masked_cross_entropy(logits, target, mask)
    loss.backward()
    cls = (target[mask] + 1).long()
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[mask], cls).item(), rel=1e-6)
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).any(dim=-1).all()
    assert compute_loss(logits, target, mask).item() == loss.item()  # (B, K, 3) -> cross-entropy
    pred = torch.tanh(logits[..., 0]).detach()
    assert compute_loss(pred, target, mask).item() == masked_mse(pred, target, mask).item()
    assert masked_cross_entropy(logits, target, torch.zeros_like(mask)).item() == 0.0


def test_three_class_training_run_rebuilds_and_predicts_in_range(models, tiny_args, tmp_path):
    train.main(tiny_args("--pathology", "Cardiomegaly", "--head-type", "three-class", "--arch", "resnet18"))
    path = tmp_path / "ckpt" / "cardiomegaly" / "best.pt"
    model, ckpt = load_checkpoint(path)
    assert ckpt.model_config["head_type"] == "three-class" and ckpt.model_config["arch"] == "resnet18"
    with torch.no_grad():
        out = model(images(5))
    score = model.score(out)
    assert out.shape == (5, 1, 3) and score.shape == (5, 1) and score.abs().max() <= 1
    history = pd.read_csv(tmp_path / "ckpt" / "cardiomegaly" / "history.csv")
    assert np.isfinite(history["train_loss"]).all() and np.isfinite(history["val_mse"]).all()

    start = build_model(model_config(["Fracture"], hidden=8, arch="resnet18"))  # its backbone as --weights
    assert load_pretrained(start, str(path)) == {"source": "checkpoint", "mean": IMAGE_MEAN, "std": IMAGE_STD}
    assert torch.equal(start.backbone.layer4[1].conv2.weight, model.backbone.layer4[1].conv2.weight)
    with pytest.raises(UserError, match=r"best.pt: a checkpoint of a resnet18 model; use --arch resnet18$"):
        load_pretrained(models("resnet50"), str(path))


def test_multi_head_three_class_run_feeds_a_submission(demo_root, tiny_args, tmp_path):
    names = ["Cardiomegaly", "Pleural Effusion"]
    train.main(tiny_args("--pathology", *names, "--multi-head", "--head-type", "three-class", "--arch", "resnet18"))
    model, ckpt = load_checkpoint(tmp_path / "ckpt" / "multi_head" / "best.pt")
    assert ckpt.pathologies == names and model(images(2)).shape == (2, 2, 3)
    make_submission.main(["--data-root", str(demo_root), "--checkpoints", str(tmp_path / "ckpt"),
                          "--out", str(tmp_path / "sub.csv"), "--cache-dir", str(tmp_path / "cache"),
                          "--fill-missing", "0", "--workers", "1", "--no-progress"])
    values = pd.read_csv(tmp_path / "sub.csv")[names].to_numpy()
    assert np.isfinite(values).all() and np.abs(values).max() <= 1 and len(np.unique(values)) > 2


# ---------------------------------------------------------------------------------------------
# float32 heads under autocast

@pytest.mark.parametrize("head_type", ["regression", "three-class"])
def test_heads_run_in_float32_under_bf16_autocast(head_type):
    """Saturated outputs near 1 differ by far less than bf16's step there (2**-8); rounded to bf16
    they would tie, which costs AUC."""
    torch.manual_seed(0)
    model = build_model(model_config(["Cardiomegaly"], hidden=8, arch="resnet18", head_type=head_type)).eval()
    last = model.heads[0][3]
    with torch.no_grad():
        last.weight.mul_(0.05)
        last.bias.copy_(torch.tensor([3.0]) if head_type == "regression" else torch.tensor([-3.0, 0.0, 3.0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(8))
        score = model.score(out)
    assert out.dtype == torch.float32 and score.dtype == torch.float32
    assert score.min() > 0.9  # near 1, where bf16's grid is coarse
    assert len(torch.unique(score)) > len(torch.unique(score.bfloat16().float()))


def test_resuming_a_run_keeps_the_normalisation_of_its_weights(tiny_args, tmp_path):
    """A run started from torchxrayvision weights and resumed must keep their [-1024, 1024] scale."""
    torch.save(xrv_densenet_state(), tmp_path / "densenet121-res224-all.pt")
    argv = tiny_args("--pathology", "Cardiomegaly", "--arch", "densenet121", "--freeze", "5", "--patience", "0",
                     "--weights", str(tmp_path / "densenet121-res224-all.pt"))
    train.main(argv)
    train.main([*argv, "--epochs", "2", "--resume"])
    _, last = load_checkpoint(tmp_path / "ckpt" / "cardiomegaly" / "last.pt")
    assert last.epoch == 2
    assert (last.model_config["mean"], last.model_config["std"]) == (XRV_MEAN, XRV_STD)
    assert (last.preprocess["mean"], last.preprocess["std"]) == (XRV_MEAN, XRV_STD)


def test_a_version_2_checkpoint_without_image_size_still_loads(models, tmp_path):
    """Version 3 added model_config['image_size'] (timm ViTs are built for it); older files lack it."""
    model = models("resnet18").eval()
    ckpt = Checkpoint.of(model, epoch=1, preprocess={"image_size": 32, "square": "resize", "mean": IMAGE_MEAN,
                                                     "std": IMAGE_STD, "uncertain": "keep"})
    config = {k: v for k, v in model.config.items() if k != "image_size"}
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, **vars(ckpt), "model_config": config}, tmp_path / "v2.pt")
    rebuilt, loaded = load_checkpoint(tmp_path / "v2.pt")
    assert "image_size" not in loaded.model_config
    with torch.no_grad():
        assert torch.equal(rebuilt(images(2)), model(images(2)))
