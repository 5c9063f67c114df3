"""Label policies: what an uncertain or a blank label becomes as a training target, one policy for
every pathology or one per pathology. Training targets only: validation, calibration, blends and
metrics always score the source labels (read_train_csv's, uncertain = 0), as the leaderboard does.

    --uncertain ones
    --uncertain "Atelectasis=ones,Cardiomegaly=three-class,default=keep"
    --blank "Cardiomegaly=negative,default=ignore"
    --lsr-ones 0.55,0.85 --lsr-zeros 0,0.3

An uncertain label (0 on the project's scale) becomes, per policy: keep 0; ignore masked (NaN);
ones 1 (U-Ones); zeros -1 (U-Zeros); lsr-ones / lsr-zeros a target drawn uniformly per sample and
epoch from a range (label smoothing, Pham et al. 2021: [0.55, 0.85] and [0, 0.30] on the 0-1 scale,
mapped to the project's [-1, 1] by x -> 2x - 1); three-class: the pathology is trained by the
three-class head on its source label. A blank becomes: ignore masked (the default); negative -1
(LibAUC's CheXpert recipe).

Flag values stay text (canonical `NAME=POLICY,...`), so args.yaml repeats them and a config's
mapping (`uncertain: {Atelectasis: ones, default: keep}`, which config.py turns into that text)
works alike; policies_from_args resolves them for the pathologies a model trains.
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np

from common import must_keep
from dataset import UNCERTAIN_POLICIES as FIXED_POLICIES
from dataset import canonical_pathology, uncertain_targets

UNCERTAIN = (*FIXED_POLICIES, "lsr-ones", "lsr-zeros", "three-class")
BLANK = ("ignore", "negative")
DEFAULTS = {"uncertain": "keep", "blank": "ignore"}
# Pham et al. 2021 (label smoothing regularisation), on the 0-1 scale: flags --lsr-ones, --lsr-zeros
LSR_RANGES = {"lsr-ones": (0.55, 0.85), "lsr-zeros": (0.0, 0.30)}


def parse_policy_map(text: str, choices: tuple[str, ...]) -> dict[str, str]:
    """'ones' -> {'default': 'ones'}; 'atelectasis=ones, default=keep' -> {'Atelectasis': 'ones',
    'default': 'keep'} (pathology names as in dataset.ALL_LABELS, matched case-insensitively, '_'
    for a space). Raises ValueError, one line, for an unknown policy or pathology, an entry
    without '=', or a name given twice."""
    text = str(text).strip()
    if "=" not in text:
        if text not in choices:
            raise ValueError(f"unknown policy {text!r} (choose from {', '.join(choices)}, or NAME=POLICY,...)")
        return {"default": text}
    out = {}
    for entry in text.split(","):
        name, eq, policy = (part.strip() for part in entry.partition("="))
        if not eq:
            raise ValueError(f"{entry.strip()!r} is not NAME=POLICY (in {text!r})")
        canon = "default" if name.lower() == "default" else canonical_pathology(name)
        if canon is None:
            raise ValueError(f"unknown pathology {name!r} in {text!r} (a pathology name, or default)")
        if policy not in choices:
            raise ValueError(f"unknown policy {policy!r} for {canon} (choose from {', '.join(choices)})")
        if canon in out:
            raise ValueError(f"{canon} is given twice in {text!r}")
        out[canon] = policy
    return out


def format_policy_map(policies: dict[str, str]) -> str:
    """The canonical text of parse_policy_map's result: 'ones', or 'Atelectasis=ones,default=keep'."""
    if list(policies) == ["default"]:
        return policies["default"]
    return ",".join(f"{name}={policy}" for name, policy in policies.items())


def policy_arg(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type: checks a POLICY or NAME=POLICY,... text and returns it canonical."""
    def policy_map(text: str) -> str:
        try:
            return format_policy_map(parse_policy_map(text, choices))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return policy_map


def lsr_range(text: str) -> tuple[float, float]:
    """'0.55,0.85' -> (0.55, 0.85): a range on the 0-1 scale. ValueError, one line, unless two
    numbers LOW,HIGH with 0 <= LOW <= HIGH <= 1."""
    parts = str(text).split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not LOW,HIGH (two numbers, e.g. 0.55,0.85)") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"{text!r}: LOW,HIGH must lie within [0, 1] with LOW <= HIGH (on the 0-1 scale)")
    return low, high


def lsr_range_arg(text: str) -> str:
    """An argparse type: checks a LOW,HIGH range (lsr_range) and returns it canonical, '0.55,0.85'."""
    try:
        low, high = lsr_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return f"{low:g},{high:g}"


def add_label_policy_flags(g) -> None:
    """--uncertain, --blank, --lsr-ones and --lsr-zeros on a parser or group, each must_keep (they
    change what is trained). Their values are canonical text; policies_from_args resolves them."""
    must_keep(g.add_argument(
        "--uncertain", type=policy_arg(UNCERTAIN), default=DEFAULTS["uncertain"], metavar="POLICY|NAME=POLICY,...",
        help="what an uncertain label (0) becomes as a training target, one policy for all or per pathology "
        "('Atelectasis=ones,Cardiomegaly=three-class,default=keep'): keep (0), ignore (masked), ones (1), "
        "zeros (-1), lsr-ones / lsr-zeros (a soft target drawn per sample and epoch from --lsr-ones / --lsr-zeros), "
        "three-class (the three-class head); validation always scores uncertain as 0"))
    must_keep(g.add_argument(
        "--blank", type=policy_arg(BLANK), default=DEFAULTS["blank"], metavar="POLICY|NAME=POLICY,...",
        help="what a blank label becomes in training, one policy for all or per pathology: ignore (masked) or "
        "negative (-1); validation never scores blanks"))
    for policy, (low, high) in LSR_RANGES.items():
        must_keep(g.add_argument(
            f"--{policy}", type=lsr_range_arg, default=f"{low:g},{high:g}", metavar="LOW,HIGH",
            help=f"range of the {policy} soft targets on the 0-1 scale (x -> 2x - 1 on the project's [-1, 1])"))


def policies_for(text: str, names: list[str], kind: str) -> dict[str, str]:
    """name -> policy for each of `names`, from a --uncertain (kind 'uncertain') or --blank ('blank')
    text: the pathology's own entry, else the map's default, else DEFAULTS[kind]. A map may name
    pathologies a model does not train (one config for every model). Raises ValueError as
    parse_policy_map does."""
    choices = UNCERTAIN if kind == "uncertain" else BLANK
    given = parse_policy_map(text, choices)
    return {name: given.get(name, given.get("default", DEFAULTS[kind])) for name in names}


def policies_from_args(args: argparse.Namespace, names: list[str]) -> tuple[dict, dict, dict]:
    """(uncertain, blank, lsr) for training_targets, from the flags of add_label_policy_flags:
    name -> policy for each of names, twice, and policy -> (low, high) on the 0-1 scale."""
    return (policies_for(args.uncertain, names, "uncertain"), policies_for(args.blank, names, "blank"),
            {"lsr-ones": lsr_range(args.lsr_ones), "lsr-zeros": lsr_range(args.lsr_zeros)})


def three_class_names(uncertain: dict[str, str]) -> list[str]:
    """The pathologies whose policy routes them to the three-class head (trained on the source label)."""
    return [name for name, policy in uncertain.items() if policy == "three-class"]


def _of(policies: dict[str, str] | str, name: str, kind: str) -> str:
    """The policy of pathology `name` (policies: name -> policy, or one str for all); ValueError
    for a value that is not a policy of `kind` ('uncertain' or 'blank')."""
    policy = policies if isinstance(policies, str) else policies[name]
    if policy not in (UNCERTAIN if kind == "uncertain" else BLANK):
        raise ValueError(f"unknown {kind} policy {policy!r} for {name}")
    return policy


def training_targets(source: np.ndarray, names: list[str], uncertain: dict[str, str] | str,
                     blank: dict[str, str] | str = "ignore",
                     lsr: dict[str, tuple[float, float]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training targets of source labels under the policies: (low, high), float32 (N, K) on the
    project's [-1, 1] scale, NaN = not in the loss, low == high where the target is fixed.

    source (N, K) on the project's scale (1 positive, 0 uncertain, -1 negative, NaN blank), column
    k = names[k]; uncertain, blank: name -> policy (a str: the same for all); lsr: policy -> (low,
    high) on the 0-1 scale (default LSR_RANGES). Positives and negatives stay 1 and -1. An uncertain
    label under lsr-ones / lsr-zeros gets [2 low - 1, 2 high - 1]: the trainer draws low + (high -
    low) * U(0, 1) per sample and epoch; under three-class it stays 0 (the three-class head's
    class). A blank under negative becomes -1. Validation never goes through this."""
    source = np.asarray(source, dtype=np.float32).reshape(len(source), -1)
    lsr = {**LSR_RANGES, **(lsr or {})}
    low, high = np.empty_like(source), np.empty_like(source)
    for k, name in enumerate(names):
        col, policy = source[:, k], _of(uncertain, name, "uncertain")
        low[:, k] = high[:, k] = uncertain_targets(col, policy if policy in FIXED_POLICIES else "keep")
        if policy in ("lsr-ones", "lsr-zeros"):
            u = col == 0.0
            low[u, k], high[u, k] = 2.0 * lsr[policy][0] - 1.0, 2.0 * lsr[policy][1] - 1.0
        if _of(blank, name, "blank") == "negative":
            low[np.isnan(col), k] = high[np.isnan(col), k] = -1.0
    return low, high


def policy_counts(source: np.ndarray, low: np.ndarray, names: list[str], uncertain: dict[str, str] | str,
                  blank: dict[str, str] | str) -> dict[str, dict]:
    """Per pathology, for summary.json: its policies and the training entries they give. source,
    low (N, K) as training_targets takes and returns them. Keys: uncertain, blank (the policies),
    n_loss (entries in the loss), n_uncertain_loss (uncertain labels among them), n_blank_negative
    (blanks trained as negatives)."""
    source = np.asarray(source, dtype=np.float32).reshape(len(source), -1)
    out = {}
    for k, name in enumerate(names):
        in_loss = ~np.isnan(low[:, k])
        out[name] = {"uncertain": _of(uncertain, name, "uncertain"), "blank": _of(blank, name, "blank"),
                     "n_loss": int(in_loss.sum()),
                     "n_uncertain_loss": int((in_loss & (source[:, k] == 0)).sum()),
                     "n_blank_negative": int((in_loss & np.isnan(source[:, k])).sum())}
    return out
