"""timm backbones (--arch timm/NAME): building, heads, checkpoints, --weights imagenet|PATH, --freeze
groups, --layer-decay groups, --grad-checkpointing, saliency and a submission. Tiny models at 32 px,
built without weights (nothing is downloaded), each once per module."""
import copy

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import timm.models._builder
import torch
from PIL import Image

import make_submission
from common import UserError
from experiments import saliency
from model import (Checkpoint, build_model, check_arch, load_checkpoint, model_config, n_stages, param_groups,
                   set_frozen, set_grad_checkpointing)
from weights import load_pretrained

NAMES = ["Cardiomegaly", "Fracture"]
SIZE = 32
# arch -> (its coarse groups: what --freeze counts, its fine groups: what --layer-decay scales)
TINY = {
    "timm/resnet10t": (5, 5),  # stem, layer1..4 (a BatchNorm net)
    "timm/convnext_atto": (5, 13),  # stem, 4 stages / stem, 12 blocks (head norm in the last)
    # timm's 6-block test ViT, the VisionTransformer of vit_tiny_patch16_224 at a tenth of its build time
    "timm/test_vit": (7, 7),  # patch embedding, 6 blocks; 2 x 2 patches of 16 px at 32 px
}


@pytest.fixture(scope="module")
def models():
    """(arch, head_type) -> a random-init model for NAMES with small heads at 32 px, built on first use."""
    cache = {}

    def get(arch, head_type="regression"):
        if (arch, head_type) not in cache:
            torch.manual_seed(0)
            cache[arch, head_type] = build_model(model_config(NAMES, hidden=8, arch=arch, head_type=head_type,
                                                              image_size=SIZE))
        return cache[arch, head_type]
    return get


def images(n=2, size=SIZE, seed=0):
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# --arch names

def test_check_arch_takes_timm_names_with_tags_and_names_the_fix_for_others():
    for name in ("timm/convnextv2_tiny.fcmae_ft_in22k_in1k", "timm/swinv2_tiny_window8_256.ms_in1k",
                 "timm/vit_small_patch14_dinov2.lvd142m", "timm/resnet10t", "resnet50"):
        assert check_arch(name) == name
    assert check_arch(" timm/resnet10t ") == "timm/resnet10t"
    with pytest.raises(UserError) as e:
        check_arch("resnet10t")
    assert one_line(e).endswith("; timm has it: --arch timm/resnet10t)")
    with pytest.raises(UserError) as e:
        check_arch("resnet-50")
    assert "choices: resnet18, resnet50" in one_line(e) and "timm/NAME" in str(e.value)
    with pytest.raises(UserError) as e:
        check_arch("timm/convnext_tiniest")
    assert one_line(e).startswith("--arch timm/convnext_tiniest: not a model timm ")
    assert "close: convnext_" in str(e.value)
    with pytest.raises(UserError, match=r"^--arch timm/resnet10t.nope: timm has no pretrained tag 'nope' for "
                                        r"resnet10t \(tags: c3_in1k\)$"):
        check_arch("timm/resnet10t.nope")
    with pytest.raises(UserError, match="timm/nosuchnet"):
        model_config(NAMES, arch="timm/nosuchnet")


# ---------------------------------------------------------------------------------------------
# the model: outputs, heads, checkpoints

@pytest.mark.parametrize("arch", list(TINY))
def test_timm_model_gives_k_outputs_in_range_through_its_features(models, arch):
    model = models(arch).eval()
    x = images(3)
    with torch.no_grad():
        out, feats = model(x), model.feature_map(x)
        via_features = model.from_feature_map(feats)
    assert out.shape == (3, 2) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    assert torch.equal(out, via_features)
    assert model.backbone.get_submodule(model.stem).in_channels == 1  # timm's in_chans=1
    assert model.config["arch"] == arch and model.config["image_size"] == SIZE
    assert model.has_feature_map == (feats.dim() == 4) == ("vit" not in arch)


def test_timm_three_class_head_scores_in_range(models):
    model = models("timm/convnext_atto", "three-class").eval()
    with torch.no_grad():
        out = model(images(4))
    score = model.score(out)
    assert out.shape == (4, 2, 3) and score.shape == (4, 2) and score.abs().max() <= 1


@pytest.mark.parametrize("arch", list(TINY))
def test_checkpoint_rebuilds_a_timm_model_from_the_file_alone(models, arch, tmp_path):
    model = models(arch).eval()
    path = tmp_path / "best.pt"
    Checkpoint.of(model, epoch=1, preprocess={"image_size": SIZE, "square": "resize", "mean": 0.449, "std": 0.226,
                                              "uncertain": "keep"}).save(path)
    rebuilt, ckpt = load_checkpoint(path)
    assert ckpt.model_config["arch"] == arch and ckpt.model_config["image_size"] == SIZE
    with torch.no_grad():
        assert torch.equal(rebuilt(images(3, seed=1)), model(images(3, seed=1)))


def test_a_timm_checkpoint_feeds_a_submission(models, demo_root, tmp_path):
    model = models("timm/convnext_atto").eval()
    folder = tmp_path / "ckpt" / "multi_head"
    Checkpoint.of(model, epoch=1, preprocess={"image_size": SIZE, "square": "resize", "mean": 0.449, "std": 0.226,
                                              "uncertain": "keep"}).save(folder / "best.pt")
    make_submission.main(["--data-root", str(demo_root), "--checkpoints", str(tmp_path / "ckpt"),
                          "--out", str(tmp_path / "sub.csv"), "--cache-dir", str(tmp_path / "cache"),
                          "--fill-missing", "0", "--workers", "1", "--no-progress"])
    values = pd.read_csv(tmp_path / "sub.csv")[NAMES].to_numpy()
    assert np.isfinite(values).all() and np.abs(values).max() <= 1 and len(np.unique(values)) > 2


# ---------------------------------------------------------------------------------------------
# --freeze groups, --layer-decay groups, --grad-checkpointing

@pytest.mark.parametrize("arch", list(TINY))
def test_set_frozen_freezes_timms_coarse_groups_in_order(models, arch):
    model = copy.deepcopy(models(arch))
    groups = model.groups()
    params = dict(model.backbone.named_parameters())
    sizes = [sum(params[n].numel() for n in g) for g in groups]
    assert n_stages(model) == len(groups) == TINY[arch][0] and all(sizes)
    assert sum(sizes) == n_params(model.backbone) and len({n for g in groups for n in g}) == len(params)
    assert groups[0][0] in ("conv1.0.weight", "stem.0.weight", "cls_token")  # the stem first
    batchnorms = {n: m for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for n in range(len(groups) + 1):
        set_frozen(model, n)
        model.train()
        assert n_params(model, trainable_only=True) == n_params(model) - sum(sizes[:n]), n
        frozen = {name for g in groups[:n] for name in g}
        for name, bn in batchnorms.items():  # frozen BatchNorm keeps its statistics
            assert bn.training == (f"{name}.weight" not in frozen), (n, name)
    assert n_params(model, trainable_only=True) == n_params(model.heads)
    assert not model.backbone.training  # all groups frozen: the whole backbone in eval
    set_frozen(model, 0)
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())
    with pytest.raises(ValueError):
        set_frozen(model, len(groups) + 1)


def scales_by_name(model, layer_decay):
    groups = param_groups(model, weight_decay=0.05, layer_decay=layer_decay)
    by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert all(g["weight_decay"] == 0.05 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(by_id) == len(list(model.parameters()))  # each once
    return {name: by_id[id(p)] for name, p in model.named_parameters()}, groups


def test_layer_decay_scales_timm_blocks_from_the_heads_down(models):
    scales, groups = scales_by_name(models("timm/resnet10t"), 0.5)
    assert groups[0]["lr_scale"] == 1.0  # heads first: param_groups[0]'s lr is the base rate
    assert scales["heads.0.0.weight"] == scales["heads.1.3.bias"] == 1.0
    assert scales["backbone.layer4.0.conv1.weight"] == 0.5
    assert scales["backbone.layer1.0.bn1.bias"] == 0.5 ** 4
    assert scales["backbone.conv1.0.weight"] == scales["backbone.bn1.weight"] == 0.5 ** 5  # the stem

    scales, _ = scales_by_name(models("timm/test_vit"), 0.8)
    assert scales["backbone.blocks.5.mlp.fc2.weight"] == scales["backbone.norm.weight"] == 0.8
    assert scales["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.8 ** 6)
    assert scales["backbone.cls_token"] == scales["backbone.patch_embed.proj.weight"] == pytest.approx(0.8 ** 7)

    scales, _ = scales_by_name(models("timm/convnext_atto"), 0.5)
    assert scales["backbone.head.norm.weight"] == scales["backbone.stages.3.blocks.1.gamma"] == 0.5
    assert scales["backbone.stem.0.weight"] == 0.5 ** 13

    scales, groups = scales_by_name(models("timm/convnext_atto"), 1.0)  # off: today's single group
    assert len(groups) == 1 and set(scales.values()) == {1.0}
    with pytest.raises(ValueError):
        param_groups(models("timm/convnext_atto"), 0.05, layer_decay=0.0)


def outputs_and_grads(model, x):
    torch.manual_seed(0)  # the same dropout draws
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["timm/resnet10t", "timm/test_vit"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(models, arch):
    plain = copy.deepcopy(models(arch)).train()
    saving = copy.deepcopy(plain)
    set_grad_checkpointing(saving)
    x = images(4)
    out, grads = outputs_and_grads(plain, x)
    out_ckpt, grads_ckpt = outputs_and_grads(saving, x)
    assert torch.allclose(out, out_ckpt, atol=1e-6) and grads.keys() == grads_ckpt.keys()
    assert all(torch.allclose(grads[n], grads_ckpt[n], atol=1e-5) for n in grads)


def test_grad_checkpointing_where_timm_has_none_is_one_line():
    model = build_model(model_config(["Cardiomegaly"], hidden=8, arch="timm/dla46_c", image_size=SIZE))
    with pytest.raises(UserError, match=r"^--grad-checkpointing: timm implements none for timm/dla46_c; drop the "
                                        r"flag or use another --arch$"):
        set_grad_checkpointing(model)


# ---------------------------------------------------------------------------------------------
# --weights imagenet | PATH

def rgb_resnet10t_state(seed=5) -> dict:
    """What timm's resnet10t.c3_in1k file holds: an RGB stem and a 1000-way classifier."""
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_timm_file_loads_with_the_stem_folded_to_one_channel(models, tmp_path, suffix):
    ref = rgb_resnet10t_state()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(ref, path)
    else:  # as timm's train.py keeps it: under 'state_dict', names prefixed by DistributedDataParallel
        torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}}, path)
    model = copy.deepcopy(models("timm/resnet10t"))
    assert load_pretrained(model, str(path)) == {"source": "timm", "mean": 0.449, "std": 0.226}
    got = model.backbone.state_dict()
    assert ref["conv1.0.weight"].shape[1] == 3
    assert torch.allclose(got["conv1.0.weight"], ref["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(got["layer4.0.conv2.weight"], ref["layer4.0.conv2.weight"])
    assert torch.equal(got["layer3.0.bn1.running_var"], ref["layer3.0.bn1.running_var"])
    assert (model.config["mean"], model.config["std"]) == (0.449, 0.226)


def test_a_160_px_vit_file_loads_into_a_32_px_vit(models, tmp_path):
    torch.manual_seed(6)
    ref = timm.create_model("test_vit", pretrained=False).state_dict()  # 10 x 10 patches, RGB
    safetensors.torch.save_file(ref, tmp_path / "vit.safetensors")
    model = copy.deepcopy(models("timm/test_vit"))
    assert load_pretrained(model, str(tmp_path / "vit.safetensors"))["source"] == "timm"
    got = model.backbone.state_dict()
    assert ref["pos_embed"].shape == (1, 1 + 10 * 10, 64) and got["pos_embed"].shape == (1, 1 + 2 * 2, 64)  # resized
    assert torch.allclose(got["patch_embed.proj.weight"], ref["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert torch.equal(got["blocks.5.mlp.fc2.weight"], ref["blocks.5.mlp.fc2.weight"])
    assert (model.config["mean"], model.config["std"]) == (0.5, 0.5)  # this model's own normalisation


def test_wrong_or_unreadable_timm_files_are_one_line_errors(models, tmp_path):
    torch.manual_seed(7)
    safetensors.torch.save_file(timm.create_model("convnext_atto").state_dict(), tmp_path / "convnext.safetensors")
    model = copy.deepcopy(models("timm/resnet10t"))
    with pytest.raises(UserError) as e:
        load_pretrained(model, str(tmp_path / "convnext.safetensors"))
    assert one_line(e).startswith(f"--weights {tmp_path / 'convnext.safetensors'}: not timm's resnet10t weights (")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk.pth: not a loadable timm state dict"):
        load_pretrained(model, str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match=r"nope.safetensors: no such file"):
        load_pretrained(model, str(tmp_path / "nope.safetensors"))


def test_our_timm_checkpoint_starts_another_run(models, tmp_path):
    source = models("timm/convnext_atto")
    Checkpoint.of(source, epoch=1, preprocess={"image_size": SIZE, "square": "resize", "mean": 0.449, "std": 0.226,
                                               "uncertain": "keep"}).save(tmp_path / "best.pt")
    start = build_model(model_config(["Pneumonia"], hidden=8, arch="timm/convnext_atto", image_size=SIZE))
    assert load_pretrained(start, str(tmp_path / "best.pt"))["source"] == "checkpoint"
    key = "stages.3.blocks.1.mlp.fc2.weight"
    assert torch.equal(start.backbone.state_dict()[key], source.backbone.state_dict()[key])
    with pytest.raises(UserError, match=r"best.pt: a checkpoint of a timm/convnext_atto model; "
                                        r"use --arch timm/convnext_atto$"):
        load_pretrained(copy.deepcopy(models("timm/resnet10t")), str(tmp_path / "best.pt"))


def test_imagenet_means_timms_pretrained_weights_folded_to_one_channel(models, monkeypatch):
    ref = rgb_resnet10t_state()
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", lambda *a, **k: dict(ref))
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", lambda *a, **k: dict(ref))
    model = copy.deepcopy(models("timm/resnet10t"))
    assert load_pretrained(model, "imagenet") == {"source": "imagenet", "mean": 0.449, "std": 0.226}
    assert torch.allclose(model.backbone.conv1[0].weight, ref["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer2[0].conv1.weight, ref["layer2.0.conv1.weight"])


def test_imagenet_weights_offline_name_the_file_and_the_alternatives(models, monkeypatch):
    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"^could not download the pretrained timm/resnet10t weights \(OSError: .*\); "
                                        r"use --weights PATH with a local copy of model.safetensors from "
                                        r"https://huggingface.co/timm/resnet10t.c3_in1k, or --weights none$"):
        load_pretrained(copy.deepcopy(models("timm/resnet10t")), "imagenet")
    no_weights = build_model(model_config(["Cardiomegaly"], hidden=8, arch="timm/convnext_atto_rms", image_size=SIZE))
    with pytest.raises(UserError, match=r"^timm has no pretrained weights for timm/convnext_atto_rms; use --weights "
                                        r"PATH or --weights none$"):
        load_pretrained(no_weights, "imagenet")


# ---------------------------------------------------------------------------------------------
# experiments/saliency.py

def saliency_run(model, tmp_path, size):
    ckpt = tmp_path / "best.pt"
    Checkpoint.of(model, epoch=1, preprocess={"image_size": size, "square": "resize", "mean": 0.449, "std": 0.226,
                                              "uncertain": "keep"}).save(ckpt)
    image = tmp_path / "pid1" / "study1" / "view1_frontal.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 70), dtype=np.uint8)).save(image)
    return saliency.main(["--checkpoint", str(ckpt), "--images", str(image), "--out", str(tmp_path / "out"),
                          "--pathology", "Cardiomegaly", "--no-progress"])


def test_saliency_of_a_convolutional_timm_model_writes_a_png(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config(NAMES, hidden=8, arch="timm/convnext_atto", image_size=64))  # 2 x 2 map
    (result,) = saliency_run(model, tmp_path, 64)
    assert result["png"].is_file() and result["png"].read_bytes()[:4] == b"\x89PNG"
    assert result["cam"].shape == (64, 64) and 0 <= result["cam"].min() and result["cam"].max() <= 1


def test_saliency_of_a_vit_says_it_has_no_feature_map(models, tmp_path):
    with pytest.raises(UserError) as e:
        saliency_run(models("timm/test_vit"), tmp_path, SIZE)
    assert one_line(e).endswith("its timm/test_vit has no spatial feature map (its features are tokens), "
                                "which Grad-CAM needs; use a model of a convolutional --arch")
    assert not (tmp_path / "out").exists()
