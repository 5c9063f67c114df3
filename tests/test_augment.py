"""On-device augmentation (dataset.augment_batch, train.py --augment): values, geometry, wiring."""
import json

import pytest
import torch

import train
from augment import AUGMENT_PRESETS, augment_batch
from model import IMAGE_MEAN


def spot_image(n: int = 1, size: int = 32, row: int = 16, col: int = 24) -> torch.Tensor:
    """uint8 (n, 1, size, size): black with one bright 2x2 spot whose top-left pixel is (row, col)."""
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, row:row + 2, col:col + 2] = 255
    return x


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) row, col of each image's brightness centre; x (B, 1, S, S)."""
    w = x.float()[:, 0]
    idx = torch.arange(w.shape[-1], dtype=torch.float32)
    total = w.sum((1, 2))
    return torch.stack([(w.sum(2) * idx).sum(1) / total, (w.sum(1) * idx).sum(1) / total], 1)


def texture(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 1, size, size) with mid-range values, so that no jitter clips at 0 or 255."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(60, 190, (n, 1, size, size), generator=g, dtype=torch.uint8)


def test_none_returns_the_input_itself():
    x = texture()
    out = augment_batch(x, "none")
    assert out is x and torch.equal(out, texture())


@pytest.mark.parametrize("preset", [p for p in AUGMENT_PRESETS if p != "none"])
def test_every_preset_keeps_dtype_shape_device_and_changes_pixels(preset):
    x = texture(4, 48)
    out = augment_batch(x, preset, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == (4, 1, 48, 48) and out.device == x.device
    assert not torch.equal(out, x)


def test_a_fixed_generator_reproduces_and_samples_differ():
    x = texture(1).repeat(6, 1, 1, 1)  # six copies of one image
    a = augment_batch(x, "strong", torch.Generator().manual_seed(7))
    b = augment_batch(x, "strong", torch.Generator().manual_seed(7))
    c = augment_batch(x, "strong", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({bytes(a[i].flatten().tolist()) for i in range(6)}) == 6  # per-sample parameters


def test_identity_parameters_give_back_the_exact_pixels():
    """align_corners=False: crop of the whole image, no rotation, is the identity map."""
    x = texture()
    out = augment_batch(x, {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "degrees": (0.0, 0.0),
                            "brightness": (1.0, 1.0), "contrast": (1.0, 1.0)})
    assert torch.equal(out, x)


def test_rotation_turns_a_spot_counter_clockwise():
    x = spot_image(row=15, col=24)  # centre of mass (15.5, 24.5): 9 px right of the centre (15.5, 15.5)
    up = centre_of_mass(augment_batch(x, {"degrees": (90.0, 90.0)}))[0]
    assert up.tolist() == pytest.approx([15.5 - 9.0, 15.5], abs=0.01)  # right of the centre -> above it
    small = centre_of_mass(augment_batch(spot_image(200, row=15, col=24), {"degrees": (-10.0, 10.0)},
                                         torch.Generator().manual_seed(0)))
    angle = torch.atan2(-(small[:, 0] - 15.5), small[:, 1] - 15.5).rad2deg()  # counter-clockwise, y up
    assert angle.abs().max() <= 10.5 and angle.std() > 4.0  # spread over +-10 degrees
    assert ((small - torch.tensor([15.5, 15.5])).norm(dim=1) - 9.0).abs().max() < 0.5  # about the centre


def test_flip_preset_mirrors_a_left_spot_in_about_half_the_samples():
    x = spot_image(200, row=15, col=8)  # 7 px left of the centre
    cols = centre_of_mass(augment_batch(x, "flip", torch.Generator().manual_seed(0)))[:, 1]
    right = cols > 15.5
    assert 0.35 < right.float().mean() < 0.65
    assert (cols[right] > 19).all() and (cols[~right] < 12).all()  # mirrored, not merely moved
    kept = centre_of_mass(augment_batch(x, "standard", torch.Generator().manual_seed(0)))[:, 1]
    assert (kept < 12).all()  # standard never flips


def test_crop_zooms_in_and_keeps_the_size():
    x = spot_image(100, row=4, col=24)  # near the top edge: a zoom-in pushes it away from the centre
    out = augment_batch(x, {"scale": (0.8, 0.8), "ratio": (1.0, 1.0)}, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    lit = (out[:, 0] > 0).sum((1, 2)).float()
    assert (lit >= 4).all() & (lit.mean() > 4.5)  # a 2x2 spot magnified by 1/sqrt(0.8) covers more pixels
    offset = centre_of_mass(out) - centre_of_mass(x)
    assert offset.abs().max() <= 32 * (1 - 0.8 ** 0.5) + 1 and offset.std(0).min() > 0.5  # random crop positions


def test_brightness_and_contrast_stay_within_their_bounds():
    x = texture(200, 32)
    out = augment_batch(x, {"brightness": (0.9, 1.1), "contrast": (0.9, 1.1)}, torch.Generator().manual_seed(0))
    f, g = x.float().flatten(1), out.float().flatten(1)
    mean_ratio, std_ratio = g.mean(1) / f.mean(1), g.std(1) / f.std(1)
    assert mean_ratio.min() >= 0.9 - 0.01 and mean_ratio.max() <= 1.1 + 0.01
    assert std_ratio.min() >= 0.81 - 0.01 and std_ratio.max() <= 1.21 + 0.01
    assert mean_ratio.std() > 0.03 and (mean_ratio.max() - mean_ratio.min()) > 0.15  # spread over the range
    only_contrast = augment_batch(x, {"contrast": (1.5, 1.5)})
    assert only_contrast.float().flatten(1).mean(1) == pytest.approx(f.mean(1), abs=0.6)  # around the mean


def test_random_erasing_fills_one_rectangle_with_the_mean_gray():
    x = torch.full((100, 1, 32, 32), 200, dtype=torch.uint8)
    out = augment_batch(x, {"erase": 0.5, "erase_scale": (0.02, 0.2), "erase_ratio": (0.3, 3.3)},
                        torch.Generator().manual_seed(0))
    fill = round(IMAGE_MEAN * 255)
    assert set(out.unique().tolist()) <= {200, fill}
    erased = (out[:, 0] == fill)
    hit = erased.flatten(1).any(1)
    assert 0.3 < hit.float().mean() < 0.7
    for m in erased[hit]:  # exactly one filled axis-aligned rectangle per erased image
        rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        assert m.sum() == len(rows) * len(cols)
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
        assert 0.01 * 1024 <= m.sum() <= 0.25 * 1024


def test_unknown_parameter_is_an_error():
    with pytest.raises(ValueError, match="rotate"):
        augment_batch(texture(), {"rotate": (0, 1)})


def test_train_applies_the_preset_to_training_batches_only(tiny_args, tmp_path, monkeypatch):
    real, calls = train.augment_batch, []

    def spy(images, preset, generator=None):
        calls.append((preset, images.dtype, tuple(images.shape[1:])))
        return real(images, preset, generator)
    monkeypatch.setattr(train, "augment_batch", spy)
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--augment", "standard"))
    assert calls and all(c == ("standard", torch.uint8, (1, 32, 32)) for c in calls)
    n_batches = -(-s["n_train"] // 16)
    assert len(calls) == n_batches  # once per training batch; validation is never augmented
    summary = json.loads((tmp_path / "ckpt" / "cardiomegaly" / "summary.json").read_text())
    assert summary["config"]["augment"] == "standard"


def test_augment_defaults_to_none_and_rejects_unknown_presets(capsys):
    assert train.parse_args(["--pathology", "Cardiomegaly"]).augment == train.DEMO_DEFAULTS["augment"] == "none"
    with pytest.raises(SystemExit):
        train.parse_args(["--pathology", "Cardiomegaly", "--augment", "wild"])
    assert "invalid choice: 'wild'" in capsys.readouterr().err


def test_online_augment_still_flips_a_random_half():
    """The older --online-augment path (train.online_augment) is kept beside --augment."""
    torch.manual_seed(0)
    x = spot_image(200, row=15, col=8)
    out = train.online_augment(x, ["flip"])
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | flipped).all() and 0.35 < flipped.float().mean() < 0.65
