"""Label policies (policies.py): the training target, or the soft target's range, that each policy
gives each label value (positive, uncertain, negative, blank), per pathology, read from tiny CSVs
in both label conventions; blanks as negatives and their counts; the flags' values, from the
command line and from a config file's mapping; and every bad value as one line."""
import argparse

import numpy as np
import pytest
import torch

import config
from common import Parser
from dataset import CHEXPERT_LABELS, PATHOLOGIES, XrayDataset, read_train_csv
from policies import (LSR_RANGES, UNCERTAIN, add_label_policy_flags, policies_for, policies_from_args, policy_counts,
                      three_class_names, training_targets)
from test_labels import FINDINGS, N_ROWS, cs156b_csv, stanford_csv

# (low, high) on the project's scale for a label P positive, N negative, . blank (blank ignored) ...
FIXED = {"P": (1.0, 1.0), "N": (-1.0, -1.0), ".": (np.nan, np.nan)}
# ... and U uncertain under each policy; LSR: [0.55, 0.85] -> [0.1, 0.7], [0, 0.3] -> [-1, -0.4]
UNCERTAIN_TO = {"keep": (0.0, 0.0), "ignore": (np.nan, np.nan), "ones": (1.0, 1.0), "zeros": (-1.0, -1.0),
                "lsr-ones": (0.1, 0.7), "lsr-zeros": (-1.0, -0.4), "three-class": (0.0, 0.0)}


def read(tmp_path, convention):
    """(source labels (N_ROWS, K) on the project's scale, names) of the findings written in a
    convention's own layout and values, read through read_train_csv."""
    csv = cs156b_csv(tmp_path / "train2023.csv") if convention == "cs156b" else stanford_csv(tmp_path / "train.csv")
    df = read_train_csv(csv)
    assert df.attrs["label_convention"] == convention
    names = df.attrs["labels"]
    return df[names].to_numpy(np.float32), names


def expected(names, uncertain, blank="ignore"):
    """(low, high) (N_ROWS, K) from FINDINGS under name -> policy maps."""
    low, high = np.empty((N_ROWS, len(names))), np.empty((N_ROWS, len(names)))
    for k, name in enumerate(names):
        for i, letter in enumerate(FINDINGS[name]):
            value = UNCERTAIN_TO[uncertain[name]] if letter == "U" else FIXED[letter]
            if letter == "." and blank[name] == "negative":
                value = (-1.0, -1.0)
            low[i, k], high[i, k] = value
    return low, high


def assert_targets(got, want):
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# One policy for all, each label value, both conventions

@pytest.mark.parametrize("convention", ["cs156b", "chexpert"])
@pytest.mark.parametrize("policy", UNCERTAIN)
@pytest.mark.parametrize("blank", ["ignore", "negative"])
def test_each_policy_gives_each_label_its_target(tmp_path, convention, policy, blank):
    source, names = read(tmp_path, convention)
    before = source.copy()
    low, high = training_targets(source, names, policies_for(policy, names, "uncertain"),
                                 policies_for(blank, names, "blank"))
    assert_targets((low, high), expected(names, dict.fromkeys(names, policy), dict.fromkeys(names, blank)))
    np.testing.assert_array_equal(source, before)  # the source labels (validation's) are not touched
    # a plain string means the same policy for every pathology
    assert_targets(training_targets(source, names, policy, blank), (low, high))


def test_lsr_ranges_come_from_the_flags(tmp_path):
    source, names = read(tmp_path, "chexpert")
    args = parse(["--uncertain", "Pneumonia=lsr-ones,Atelectasis=lsr-zeros", "--lsr-ones", "0.6,0.9",
                  "--lsr-zeros", "0.1,0.2"])
    uncertain, blank, lsr = policies_from_args(args, names)
    assert lsr == {"lsr-ones": (0.6, 0.9), "lsr-zeros": (0.1, 0.2)}
    low, high = training_targets(source, names, uncertain, blank, lsr)
    u = np.array([c == "U" for c in FINDINGS["Pneumonia"]])
    k = names.index("Pneumonia")
    np.testing.assert_allclose(low[u, k], 0.2, atol=1e-6)
    np.testing.assert_allclose(high[u, k], 0.8, atol=1e-6)
    k = names.index("Atelectasis")
    u = np.array([c == "U" for c in FINDINGS["Atelectasis"]])
    np.testing.assert_allclose(np.c_[low[u, k], high[u, k]], [[-0.8, -0.6]] * u.sum(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One policy per pathology

MAP = "Atelectasis=ones,Edema=ones,Cardiomegaly=three-class,Pleural Effusion=three-class,pneumonia=lsr-ones," \
      "Consolidation=lsr-zeros,Lung_Opacity=zeros,default=ignore"
BLANKS = "No Finding=negative,Fracture=negative"


@pytest.mark.parametrize("convention", ["cs156b", "chexpert"])
def test_a_map_gives_each_pathology_its_own_policy(tmp_path, convention):
    """Names are matched as --pathology matches them; names the CSV lacks (Edema in a CS 156b file)
    are no error: one config serves every model."""
    source, names = read(tmp_path, convention)
    uncertain, blank = policies_for(MAP, names, "uncertain"), policies_for(BLANKS, names, "blank")
    assert uncertain["Pneumonia"] == "lsr-ones" and uncertain["Lung Opacity"] == "zeros"
    assert uncertain["Support Devices"] == "ignore" and blank["Support Devices"] == "ignore"
    assert three_class_names(uncertain) == ["Cardiomegaly", "Pleural Effusion"]
    low, high = training_targets(source, names, uncertain, blank)
    assert_targets((low, high), expected(names, uncertain, blank))
    # the one pathology a model trains gets its own policy
    k = names.index("Pneumonia")
    one = training_targets(source[:, [k]], ["Pneumonia"], policies_for(MAP, ["Pneumonia"], "uncertain"))
    assert_targets(one, (low[:, [k]], high[:, [k]]))


def test_blank_as_negative_counts(tmp_path):
    source, names = read(tmp_path, "chexpert")
    uncertain, blank = policies_for(MAP, names, "uncertain"), policies_for(BLANKS, names, "blank")
    low, _ = training_targets(source, names, uncertain, blank)
    counts = policy_counts(source, low, names, uncertain, blank)
    for name in names:
        f = FINDINGS[name]
        trained_u = f.count("U") if uncertain[name] != "ignore" else 0
        as_negative = f.count(".") if blank[name] == "negative" else 0
        assert counts[name] == {"uncertain": uncertain[name], "blank": blank[name],
                                "n_loss": f.count("P") + f.count("N") + trained_u + as_negative,
                                "n_uncertain_loss": trained_u, "n_blank_negative": as_negative}, name
    assert counts["Fracture"]["n_blank_negative"] == 3 and counts["No Finding"]["n_blank_negative"] == 4


def test_defaults_keep_uncertain_and_ignore_blanks(tmp_path):
    source, names = read(tmp_path, "cs156b")
    args = parse([])
    assert (args.uncertain, args.blank, args.lsr_ones, args.lsr_zeros) == ("keep", "ignore", "0.55,0.85", "0,0.3")
    uncertain, blank, lsr = policies_from_args(args, names)
    assert set(uncertain.values()) == {"keep"} and set(blank.values()) == {"ignore"} and lsr == LSR_RANGES
    low, high = training_targets(source, names, uncertain, blank, lsr)
    np.testing.assert_array_equal(low, source)  # the default trains on the source labels as they are
    np.testing.assert_array_equal(high, source)


# ---------------------------------------------------------------------------------------------
# The flags: the command line, a config file's mapping, args.yaml

def parser():
    p = Parser(prog="train.py")
    config.add_config_flag(p)
    add_label_policy_flags(p.add_argument_group("data"))
    return p


def parse(argv):
    return config.parse_args(parser(), argv)


def test_values_are_canonical_text_that_round_trips(tmp_path):
    args = parse(["--uncertain", " atelectasis = ones , default=keep", "--blank", "Fracture=negative",
                  "--lsr-ones", "0.50,0.80"])
    assert args.uncertain == "Atelectasis=ones,default=keep" and args.blank == "Fracture=negative"
    assert args.lsr_ones == "0.5,0.8"
    assert parse(["--uncertain", "default=ones"]).uncertain == "ones"
    config.write_args_yaml(tmp_path / "args.yaml", args, parser())
    again = parse(["--config", str(tmp_path / "args.yaml")])
    assert vars(again) | {"config": None} == vars(args) | {"config": None}


def test_a_config_mapping_is_the_same_as_the_text(tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("uncertain: {Atelectasis: ones, Cardiomegaly: three-class, default: keep}\n"
                   "blank:\n  Cardiomegaly: negative\nlsr-ones: 0.6,0.9\n")
    args = parse(["--config", str(cfg)])
    assert args.uncertain == "Atelectasis=ones,Cardiomegaly=three-class,default=keep"
    assert args.blank == "Cardiomegaly=negative" and args.lsr_ones == "0.6,0.9"
    assert parse(["--config", str(cfg), "--uncertain", "zeros"]).uncertain == "zeros"  # the command line wins


BAD = [
    (["--uncertain", "maybe"], "argument --uncertain: unknown policy 'maybe' (choose from keep, ignore, ones, zeros, "
                               "lsr-ones, lsr-zeros, three-class, or NAME=POLICY,...)"),
    (["--uncertain", "Atelectsis=ones"], "argument --uncertain: unknown pathology 'Atelectsis' in 'Atelectsis=ones' "
                                         "(a pathology name, or default)"),
    (["--uncertain", "Atelectasis=maybe"], "argument --uncertain: unknown policy 'maybe' for Atelectasis"),
    (["--uncertain", "Atelectasis=ones,atelectasis=zeros"], "argument --uncertain: Atelectasis is given twice"),
    (["--uncertain", "Atelectasis=ones,zeros"], "argument --uncertain: 'zeros' is not NAME=POLICY"),
    (["--blank", "ones"], "argument --blank: unknown policy 'ones' (choose from ignore, negative, or NAME=POLICY,...)"),
    (["--blank", "Cardiomegaly=zeros"], "argument --blank: unknown policy 'zeros' for Cardiomegaly (choose from "
                                        "ignore, negative)"),
    (["--lsr-ones", "0.9,0.2"], "argument --lsr-ones: '0.9,0.2': LOW,HIGH must lie within [0, 1] with LOW <= HIGH"),
    (["--lsr-zeros", "0.5,1.5"], "argument --lsr-zeros: '0.5,1.5': LOW,HIGH must lie within [0, 1]"),
    (["--lsr-ones=-0.1,0.3"], "argument --lsr-ones: '-0.1,0.3': LOW,HIGH must lie within [0, 1]"),
    (["--lsr-ones", "0.5"], "argument --lsr-ones: '0.5' is not LOW,HIGH (two numbers, e.g. 0.55,0.85)"),
    (["--lsr-zeros", "a,b"], "argument --lsr-zeros: 'a,b' is not LOW,HIGH"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: " + message), err[0]


def test_a_bad_config_mapping_is_one_line_naming_the_file(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("uncertain: {Atelectasis: maybe}\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {cfg}: uncertain: {{'Atelectasis': 'maybe'}} is not a "
                                               f"valid value (unknown policy 'maybe' for Atelectasis")


# ---------------------------------------------------------------------------------------------
# The batches the trainer draws soft targets from

class Pixels:
    """A stand-in image source: slot s is an image filled with s."""
    size = 4

    def get(self, slots):
        return torch.as_tensor(np.asarray(slots), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()


def test_the_dataset_serves_low_mask_and_spread(tmp_path):
    source, names = read(tmp_path, "chexpert")
    uncertain, blank = policies_for(MAP, names, "uncertain"), policies_for(BLANKS, names, "blank")
    low, high = training_targets(source, names, uncertain, blank)
    ds = XrayDataset([Pixels()], np.arange(N_ROWS), low, high - low)
    images, t, mask, spread = ds[list(range(N_ROWS))]
    assert images.shape == (N_ROWS, 1, 4, 4) and spread.dtype == torch.float32
    np.testing.assert_array_equal(mask.numpy(), ~np.isnan(low))
    np.testing.assert_allclose(t.numpy(), np.nan_to_num(low), atol=0)
    np.testing.assert_allclose(spread.numpy(), np.nan_to_num(high - low), atol=1e-6)
    assert (spread[~mask] == 0).all() and (spread[:, names.index("Pneumonia")] > 0).any()
    drawn = t + spread * torch.rand(t.shape, generator=torch.Generator().manual_seed(0))
    assert ((drawn >= torch.from_numpy(np.nan_to_num(low))) & (drawn <= torch.from_numpy(np.nan_to_num(high)))).all()
    one = ds[2]
    assert len(one) == 4 and one[3].shape == (len(names),)
    # without a spread, the three tensors of before
    assert len(XrayDataset([Pixels()], np.arange(N_ROWS), low)[0]) == 3


def test_policies_for_a_bad_text_raises_one_line():
    with pytest.raises(ValueError, match="unknown policy 'up' for Edema"):
        policies_for("Edema=up", CHEXPERT_LABELS, "uncertain")
    with pytest.raises(ValueError, match="unknown uncertain policy 'Edema=ones' for Edema"):
        training_targets(np.zeros((2, 1)), ["Edema"], "Edema=ones")  # a map is resolved by policies_for first
    assert policies_for("Edema=ones", PATHOLOGIES, "uncertain") == dict.fromkeys(PATHOLOGIES, "keep")
    assert isinstance(parser().parse_args([]), argparse.Namespace)
