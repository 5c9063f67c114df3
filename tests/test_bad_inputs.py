"""Issue 28's matrix of bad inputs, as the project's own test: nothing a user types can destroy their
data or their runs, and every flag is checked before work starts.

BAD_VALUES holds a bad value for EVERY flag of EVERY script's parser (a new flag without an entry
fails test_the_table_covers_every_flag_of_every_script). Each must end in exactly one stderr line
that names the flag (or the path), exit code 2 and no traceback, before any data is read: the
`no_work` guard makes the run fail loudly if it reaches the rows of a CSV, the image cache, an
image, a blend's predictions or a training step. The few checks that need the CSV's header or rows
(a --patient-col, a folder named after the CSV's pathologies) say why in their row and may read it,
still not an image. Every `--flag=--` is refused too. ISSUE_CASES are the issue's other bad inputs,
each with its expected outcome: refused with the file at stake unchanged, or accepted and right.

Runs are in-process (`run_cli(main, argv)`: the exit code and stderr a shell sees; parser.error's
SystemExit(2) is caught here, as the interpreter would end with it), on tiny data the tests make;
two subprocesses check the real command line once."""
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cache
import common
import dataset
import make_submission
import train
from common import run_cli
from experiments import blend, contrast_images, flip_images, gridsearch, saliency
from tests.conftest import ROOT, TINY
from tests.test_cache_validity import copy_images, write_csv
from tests.test_submission_guard import fake_run, make_ckpt

SCRIPTS = {"train.py": train.main, "make_submission.py": make_submission.main, "dataset.py": dataset.main,
           "gridsearch.py": gridsearch.main, "blend.py": blend.main, "saliency.py": saliency.main,
           "flip_images.py": flip_images.main, "contrast_images.py": contrast_images.main}
# Each script's good command on the test data ({name}: the `paths` fixture): a bad value is appended
# to it (argparse keeps the last value of a flag given twice); alone, each gets to its work.
IMAGES = ["--data-root", "{root}", "--cache-dir", "{tmp}/cache", "--image-size", "32", "--workers", "1"]
BASE = {
    "train.py": ["--pathology", "Cardiomegaly", "--data-root", "{root}", "--cache-dir", "{tmp}/cache",
                 "--out-dir", "{tmp}/ckpt", *TINY],
    "make_submission.py": ["--data-root", "{root}", "--checkpoints", "{ckpts}", "--out", "{tmp}/sub.csv",
                           "--cache-dir", "{tmp}/cache", "--fill-missing", "0", "--workers", "1", "--no-progress"],
    "dataset.py": IMAGES,
    "gridsearch.py": ["--pathology", "Cardiomegaly", "--out-dir", "{tmp}/grid", "--hidden", "8", "--freeze", "0",
                      "--lr", "0.001", "--data-root", "{root}", "--cache-dir", "{tmp}/cache", *TINY],
    "blend.py": ["--runs", "{runs}", "--out", "{tmp}/blend.json", "--min-rows", "10", "--no-progress"],
    "saliency.py": ["--checkpoint", "{ckpt}", "--images", "{image}", "--out", "{tmp}/sal", "--no-progress"],
    "flip_images.py": [*IMAGES, "--no-progress"],
    "contrast_images.py": [*IMAGES, "--no-progress"],
}


@dataclass
class Bad:
    """A bad value: `argv` appended to the script's BASE; the one error line contains `says`.
    `needs_csv`: why the check can only come once the CSV is read (None: it comes before)."""
    argv: list[str]
    says: str
    needs_csv: str | None = None


@dataclass
class NoBadValue:
    """A flag that takes no value a user could get wrong, and why."""
    reason: str


def switch(flag: str) -> Bad:
    """A --flag/--no-flag switch takes no value: `--amp=false` (a user's guess at turning it off)
    is refused, never read as on."""
    return Bad([f"{flag}=false"], f"argument {flag}/--no-{flag[2:]}: ignored explicit argument 'false'")


def choice(flag: str, value: str = "bogus") -> Bad:
    return Bad([flag, value], f"argument {flag}: invalid choice: '{value}'")


MISSING_CONFIG = Bad(["--config", "{tmp}/none.yaml"], "--config {tmp}/none.yaml: cannot be read")
PATIENT_COL = Bad(["--patient-col", "MRN"], "--patient-col MRN: ", needs_csv="the column is looked up in the CSV's "
                  "header, which is read with its rows")


def data_flags(csv_flag: str, image: bool = True) -> dict[str, Bad]:
    """Rows for common.add_data_flags' flags."""
    rows = {"--data-root": Bad(["--data-root", "{tmp}/no_root"], "--data-root {tmp}/no_root: no such directory"),
            csv_flag: Bad([csv_flag, "{tmp}/none.csv"], "{tmp}/none.csv: no such CSV file"),
            "--cache-dir": Bad(["--cache-dir", "{file}"], "--cache-dir {file}: is a file, not a folder"),
            "--workers": Bad(["--workers", "0"], "--workers must be at least 1, got 0")}
    if image:
        rows.update({"--image-size": Bad(["--image-size", "100000"], "--image-size must be at most 4096"),
                     "--square": choice("--square", "pad"), "--equalize": choice("--equalize", "clahe2")})
    return rows


TRAIN = {
    **data_flags("--train-csv"),
    "--image-size": Bad(["--image-size", "16"], "--image-size must be at least 32 (every --arch downsamples 32x), "
                        "got 16"),
    "--pathology": Bad(["--pathology", "Cardiomegally"], "unknown pathology 'Cardiomegally'"),
    "--config": MISSING_CONFIG,
    "--loader-workers": Bad(["--loader-workers", "-1"], "--loader-workers must be >= 0, got -1"),
    "--view": choice("--view", "sideways"),
    "--uncertain": Bad(["--uncertain", "maybe"], "argument --uncertain: unknown policy 'maybe'"),
    "--blank": Bad(["--blank", "ones"], "argument --blank: unknown policy 'ones'"),
    "--lsr-ones": Bad(["--lsr-ones", "0.9,0.2"], "argument --lsr-ones: '0.9,0.2': LOW,HIGH must lie within [0, 1]"),
    "--lsr-zeros": Bad(["--lsr-zeros", "0.5"], "argument --lsr-zeros: '0.5' is not LOW,HIGH"),
    "--patient-col": PATIENT_COL,
    "--label-convention": choice("--label-convention", "stanford"),
    "--val-frac": Bad(["--val-frac", "1.5"], "--val-frac must be between 0 and 1, got 1.5"),
    "--split-seed": Bad(["--split-seed", "-5"], "--split-seed must be between 0 and 4294967295, got -5"),
    "--folds": Bad(["--folds", "1"], "--folds must be at least 2, got 1"),
    "--fold": Bad(["--folds", "5", "--fold", "5"], "--fold must be 0..4 or all, got 5"),
    "--augmented": Bad(["--augmented", "rotate"], "--augmented rotate: not a copy that experiments/ builds; choose "
                       "from contrast, flip"),
    "--augment": choice("--augment", "heavy"),
    "--online-augment": choice("--online-augment", "rotate"),
    "--arch": Bad(["--arch", "resnet7"], "resnet7"),
    "--head-type": choice("--head-type", "binary"),
    "--weights": Bad(["--weights", "{tmp}/none.pt"], "--weights '{tmp}/none.pt' is not imagenet, none or an existing "
                     "file"),
    "--hidden": Bad(["--hidden", "0"], "--hidden must be at least 1, got 0"),
    "--dropout": Bad(["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    "--head": choice("--head", "deep"),
    "--multi-head": switch("--multi-head"),
    "--epochs": Bad(["--epochs", "0"], "--epochs must be at least 1, got 0"),
    "--batch-size": Bad(["--batch-size", "1"], "--batch-size must be at least 2 (BatchNorm cannot train on one image)"),
    "--accum-steps": Bad(["--accum-steps", "0"], "--accum-steps must be at least 1, got 0"),
    "--lr": Bad(["--lr", "nan"], "--lr must be positive and finite, got nan"),
    "--weight-decay": Bad(["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    "--layer-decay": Bad(["--layer-decay", "0"], "--layer-decay must be in (0, 1], got 0.0"),
    "--ema": Bad(["--ema", "1"], "--ema must be in (0, 1), e.g. 0.999, got 1.0"),
    "--grad-checkpointing": switch("--grad-checkpointing"),
    "--schedule": choice("--schedule", "linear"),
    "--warmup-epochs": Bad(["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1.0"),
    "--freeze": Bad(["--freeze", "9", "--arch", "resnet18"], "--freeze must be between 0 and 5, got 9"),
    "--unfreeze-epoch": Bad(["--unfreeze-epoch", "soon"], "argument --unfreeze-epoch: an epoch >= 0 or never, got "
                            "'soon'"),
    "--sampler": switch("--sampler"),
    "--sampler-cap": Bad(["--sampler-cap", "-1"], "--sampler-cap must be >= 0 (0: no bound), got -1.0"),
    "--calibration": choice("--calibration", "platt"),
    "--patience": Bad(["--patience", "-1"], "--patience must be >= 0, got -1"),
    "--keep-top": Bad(["--keep-top", "-1"], "--keep-top must be >= 0, got -1"),
    "--average-top": Bad(["--keep-top", "3", "--average-top", "1"], "--average-top must be 0 (off) or at least 2, "
                         "got 1"),
    "--val-per-epoch": Bad(["--val-per-epoch", "0"], "--val-per-epoch must be at least 1, got 0"),
    "--seed": Bad(["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    "--out-dir": Bad(["--out-dir", "{file}"], "--out-dir {file}: is a file, not a folder"),
    "--resume": switch("--resume"),
    "--overwrite": switch("--overwrite"),
    "--log": Bad(["--log", "mlflow"], "argument --log/--live-log: invalid choice: 'mlflow'"),  # argparse names both spellings
    "--save-every": Bad(["--save-every", "-1"], "--save-every must be >= 0 minutes, got -1.0"),
    "--device": choice("--device", "tpu"),
    "--amp": switch("--amp"),
    "--progress": switch("--progress"),
    "--compile": switch("--compile"),
}

SUBMISSION = {
    **data_flags("--test-csv", image=False),
    "--checkpoints": Bad(["--checkpoints", "{tmp}/none"], "--checkpoints {tmp}/none: no such directory"),
    "--out": Bad(["--out", "{tmp}"], "--out {tmp}: is a folder; give a file name"),
    "--fill-missing": Bad(["--fill-missing", "2"], "--fill-missing must be a number in [-1, 1], got 2.0"),
    "--combine": choice("--combine", "max"),
    "--ensemble": switch("--ensemble"),
    "--tta": choice("--tta", "rotate"),
    "--study-fusion": switch("--study-fusion"),
    "--blend": Bad(["--blend", "{tmp}/none.json"], "--blend {tmp}/none.json: no such file"),
    "--labels": Bad(["--labels", "{tmp}/none.csv"], "--labels {tmp}/none.csv: no such CSV file"),
    "--patient-col": Bad(["--labels", "{root}/student_labels/train2023.csv", "--patient-col", "MRN"],
                         "--patient-col MRN: ", needs_csv="the column is looked up in the --labels CSV, which is "
                         "read with its rows"),
    "--label-convention": choice("--label-convention", "stanford"),
    "--plots": Bad(["--plots", "{tmp}/plots"], "--plots needs --labels"),
    "--batch-size": Bad(["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    "--device": choice("--device", "tpu"),
    "--amp": switch("--amp"),
    "--progress": switch("--progress"),
    "--config": MISSING_CONFIG,
}

DATASET = {
    **data_flags("--csv"),
    "--shard-size": Bad(["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    "--label-convention": choice("--label-convention", "stanford"),
    "--patient-col": PATIENT_COL,
    "--labels-only": switch("--labels-only"),
    "--config": MISSING_CONFIG,
}

GRIDSEARCH = {  # the grid's values are checked by train.py's parser, once per trial, before any trains
    "--pathology": Bad(["--pathology", "Cardiomegally"], "unknown pathology 'Cardiomegally'"),
    "--hidden": Bad(["--hidden", "8", "0"], "--hidden must be at least 1, got 0"),
    "--freeze": Bad(["--freeze", "9", "--arch", "resnet18"], "--freeze must be between 0 and 5, got 9"),
    "--lr": Bad(["--lr", "0.001", "-1"], "--lr must be positive and finite, got -1.0"),
    "--unfreeze-epoch": Bad(["--unfreeze-epoch", "soon"], "argument --unfreeze-epoch: an epoch >= 0 or never"),
    "--out-dir": Bad(["--out-dir", "{file}"], "--out-dir {file}: is a file, not a folder"),
    "--shard": Bad(["--shard", "5/4"], "--shard 5/4: I must be between 1 and N"),
    "--retry-failed": switch("--retry-failed"),
    "--collect": switch("--collect"),
    "--config": MISSING_CONFIG,
}

BLEND = {
    "--runs": Bad(["--runs", "{tmp}/none"], "{tmp}/none: no such folder"),
    "--out": Bad(["--out", "{tmp}"], "--out {tmp}: is a folder; give a file name"),
    "--folds": Bad(["--folds", "1"], "--folds must be at least 2, got 1"),
    "--seed": Bad(["--seed", "-1"], "--seed must be >= 0, got -1"),
    "--min-rows": Bad(["--min-rows", "0"], "--min-rows must be at least 1, got 0"),
    "--progress": switch("--progress"),
    "--config": MISSING_CONFIG,
}

SALIENCY = {
    "--checkpoint": Bad(["--checkpoint", "{tmp}/none.pt"], "{tmp}/none.pt: no such checkpoint"),
    "--images": Bad(["--images", "{image}", "{tmp}/none.png"], "--images {tmp}/none.png: no such file"),
    "--out": Bad(["--out", "{file}"], "--out {file}: is a file, not a folder"),
    "--pathology": Bad(["--pathology", "Edema"], "--pathology Edema: {ckpt} predicts Cardiomegaly"),
    "--alpha": Bad(["--alpha", "2"], "--alpha must be in [0, 1], got 2.0"),
    "--device": choice("--device", "tpu"),
    "--progress": switch("--progress"),
    "--config": MISSING_CONFIG,
}

COPY = {**data_flags("--csv"), "--patient-col": PATIENT_COL, "--progress": switch("--progress"),
        "--config": MISSING_CONFIG}

BAD_VALUES: dict[str, dict[str, Bad | NoBadValue]] = {
    "train.py": TRAIN, "make_submission.py": SUBMISSION, "dataset.py": DATASET, "gridsearch.py": GRIDSEARCH,
    "blend.py": BLEND, "saliency.py": SALIENCY, "flip_images.py": COPY,
    "contrast_images.py": {**COPY, "--factor": Bad(["--factor", "inf"], "--factor must be positive and finite, "
                                                   "got inf")},
}


# ---------------------------------------------------------------------------------------------
# Each script's parser, as its main() builds it

class _Parser(BaseException):
    pass


def parser_of(script: str) -> common.Parser:
    """The parser script's main() builds (caught at its first parse, before anything else runs)."""
    def grab(self, *a, **k):
        raise _Parser(self)
    real = common.Parser.parse_known_args
    common.Parser.parse_known_args = grab
    try:
        SCRIPTS[script]([])
    except _Parser as e:
        return e.args[0]
    finally:
        common.Parser.parse_known_args = real
    raise AssertionError(f"{script} parsed nothing")


def flags_of(script: str) -> dict[str, object]:
    """First option string -> action, for every flag but --help."""
    return {a.option_strings[0]: a for a in parser_of(script)._actions if a.option_strings and a.dest != "help"}


# ---------------------------------------------------------------------------------------------
# The guard, the data, running a script

class Reached(BaseException):
    """A run got past its checks to real work. A BaseException: no `except Exception` can turn it
    into a one-line error and pass for a refusal."""


@pytest.fixture
def no_work(monkeypatch):
    """Every way to real work raises Reached: the rows of a CSV (a header alone, nrows=0, may be
    read: it names columns), the image cache and its copies, decoding --images, a blend's
    predictions, predicting a submission, a training step. Returns a dict: set ['csv'] = True to
    let a case read its CSV."""
    allow = {"csv": False}
    real = dataset.read_csv_lines

    def read_csv_lines(path, what="", nrows=None):
        if nrows is None and not allow["csv"]:
            raise Reached(f"the rows of {path}")
        return real(path, what, nrows)
    monkeypatch.setattr(dataset, "read_csv_lines", read_csv_lines)

    def stop(what):
        def refuse(*a, **k):
            raise Reached(what)
        return refuse
    for module, name in [(cache, "build_cache"), (dataset, "build_cache"), (flip_images, "derive_cache"),
                         (saliency, "read_images"), (blend, "shared_rows"), (make_submission, "predict_sources"),
                         (train, "train_until")]:
        monkeypatch.setattr(module, name, stop(f"{module.__name__}.{name}"))
    return allow


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Inputs made once: a checkpoint folder (untrained ResNet-18, 32 px), a finished run for
    blend.py, an image for saliency.py."""
    d = tmp_path_factory.mktemp("made")
    ckpt = make_ckpt(d / "ckpts" / "cardiomegaly" / "best.pt")
    (ckpt.parent / "summary.json").write_text("{}")  # a finished run: no warning about an unfinished one
    fake_run(d / "runs" / "a" / "cardiomegaly")
    image = d / "images" / "pid1" / "study1" / "view1_frontal.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8)).save(image)
    return {"ckpts": ckpt.parent.parent, "ckpt": ckpt, "runs": d / "runs" / "a", "image": image}


@pytest.fixture
def paths(demo_root, made, tmp_path) -> dict[str, str]:
    """The {name}s of an argv: the demo data, a scratch folder, a plain file, the made inputs."""
    (tmp_path / "a_file").write_text("not a folder\n")
    return {"root": str(demo_root), "tmp": str(tmp_path), "file": str(tmp_path / "a_file"),
            **{k: str(v) for k, v in made.items()}}


def fill(argv: list[str], paths: dict) -> list[str]:
    return [a.format(**paths) for a in argv]


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python SCRIPT ARGV`: run_cli as each script's __main__ calls
    it; parser.error's SystemExit(2) is the code the interpreter would exit with."""
    capsys.readouterr()
    try:
        code = run_cli(SCRIPTS[script], argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code: int, err: str, *says: str) -> str:
    """The contract for a refusal: exit 2, exactly one stderr line, `error: ...` containing each of says."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for s in says:
        assert s in lines[0], (s, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The matrix: every flag of every script

def test_the_table_covers_every_flag_of_every_script():
    """A new flag without a row here fails: give it a bad value (and a check), or say why it has none."""
    assert set(BAD_VALUES) == set(SCRIPTS)
    for script in SCRIPTS:
        flags = flags_of(script)
        assert sorted(set(flags) - set(BAD_VALUES[script])) == [], f"{script}: flags without a row"
        assert sorted(set(BAD_VALUES[script]) - set(flags)) == [], f"{script}: rows for no flag"


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_scripts_good_command_gets_to_its_work(script, paths, no_work, capsys):
    """The matrix appends one bad value to BASE: without it, BASE passes every check, so each
    refusal below is the bad value's."""
    with pytest.raises(Reached):
        run(script, fill(BASE[script], paths), capsys)


ROWS = [(script, flag) for script, rows in BAD_VALUES.items() for flag in rows]


@pytest.mark.parametrize("script, flag", ROWS, ids=[f"{s} {f}" for s, f in ROWS])
def test_a_bad_value_of_any_flag_ends_in_one_line_before_any_work(script, flag, paths, no_work, capsys):
    row = BAD_VALUES[script][flag]
    if isinstance(row, NoBadValue):
        pytest.skip(f"{script} {flag}: {row.reason}")
    no_work["csv"] = row.needs_csv is not None
    assert flag in row.argv[0] or flag in row.argv, row  # the row gives the flag it is filed under
    code, _, err = run(script, fill(BASE[script] + row.argv, paths), capsys)
    one_error_line(code, err, row.says.format(**paths))


VALUED = [(script, flag) for script in SCRIPTS for flag, action in flags_of(script).items() if action.nargs != 0]


@pytest.mark.parametrize("script, flag", VALUED, ids=[f"{s} {f}" for s, f in VALUED])
def test_flag_equals_dash_dash_is_refused_in_every_script(script, flag, paths, no_work, capsys):
    """argparse reads `--flag=--` as no value at all ([] for a list)."""
    code, _, err = run(script, fill(BASE[script], paths) + [f"{flag}=--"], capsys)
    one_error_line(code, err, f"argument {flag}: expected a value, got '--'")


@pytest.mark.parametrize("script, argv, says", [
    ("train.py", ["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    ("dataset.py", ["--image-size", "100000"], "--image-size must be at most 4096"),
], ids=["train.py --seed -1", "dataset.py --image-size 100000"])
def test_the_command_line_itself_exits_2_with_one_line(script, argv, says, demo_root, tmp_path):
    """Once through a real interpreter: the exit code and stderr a shell sees, no data read (the
    cache folder is never made)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--data-root", str(demo_root), "--cache-dir",
                           str(tmp_path / "cache"), *(["--pathology", "Cardiomegaly"] if script == "train.py" else []),
                           *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    one_error_line(proc.returncode, proc.stderr, says)
    assert not (tmp_path / "cache").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The issue's other bad inputs, each with its expected outcome

@dataclass
class Refused:
    """One error line holding each of `says`, exit 2; the files (or absent paths) in `unchanged` as
    they were. work=False: before any data is read (no_work), but the CSV where `needs_csv` says why;
    work=True: found while training (not_says must not be in the line)."""
    says: tuple[str, ...]
    unchanged: tuple[str, ...] = ()
    needs_csv: str | None = None
    work: bool = False
    not_says: str | None = None


@dataclass
class Starts:
    """Accepted: the run gets to its work (no_work stops it there, the CSV read: `needs_csv` says
    why), having printed `says`."""
    says: str
    needs_csv: str


@dataclass
class Accepted:
    """Runs for real to exit 0; check(paths, stdout, stderr, warnings) holds."""
    check: Callable[[dict, str, str, list[str]], None]


@dataclass
class Case:
    """SCRIPT BASE+argv (argv alone with base=False), after prepare(paths) sets the scene."""
    script: str
    argv: list[str]
    outcome: Refused | Starts | Accepted
    prepare: Callable[[dict], None] | None = None
    base: bool = True


def copy_test_csv(paths: dict) -> None:
    shutil.copy(Path(paths["root"]) / "student_labels" / "test_ids.csv", Path(paths["tmp"]) / "test.csv")


def copy_train_csv(paths: dict) -> None:
    shutil.copy(Path(paths["root"]) / "student_labels" / "train2023.csv", Path(paths["tmp"]) / "train.csv")


def interrupted_run(paths: dict) -> None:
    """What a SIGTERM leaves: last.pt (its contents do not matter to the check)."""
    folder = Path(paths["tmp"]) / "ckpt" / "cardiomegaly"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"the state of an interrupted run")


def cut_mid_row(paths: dict) -> None:
    """{tmp}/cut.csv: the training CSV cut in the middle of its line 11 (a copy that stopped)."""
    lines = (Path(paths["root"]) / "student_labels" / "train2023.csv").read_text().splitlines(keepends=True)
    (Path(paths["tmp"]) / "cut.csv").write_text("".join(lines[:10]) + lines[10][:len(lines[10]) // 3])


def column_twice(paths: dict) -> None:
    text = (Path(paths["root"]) / "student_labels" / "train2023.csv").read_text()
    header, rest = text.split("\n", 1)
    (Path(paths["tmp"]) / "dup.csv").write_text(header.replace("Fracture", "Cardiomegaly") + "\n" + rest)


def read_only(paths: dict) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (Path(paths["tmp"]) / "ro").mkdir()
    os.chmod(Path(paths["tmp"]) / "ro", 0o555)


def config_file(text: str) -> Callable[[dict], None]:
    return lambda paths: (Path(paths["tmp"]) / "c.yaml").write_text(text)


def no_cuda(paths: dict) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")


BIG_IDS = ["9007199254740993", "99999999999999999999", "7"]  # 2**53 + 1, beyond int64, a small one


def big_ids(paths: dict) -> None:
    test = pd.read_csv(Path(paths["root"]) / "student_labels" / "test_ids.csv", dtype=str)
    (Path(paths["tmp"]) / "test.csv").write_text(
        "Id,Path\n" + "".join(f"{i},{p}\n" for i, p in zip(BIG_IDS, test["Path"])))


def ids_unchanged(paths, out, err, caught) -> None:
    assert pd.read_csv(Path(paths["tmp"]) / "sub.csv", dtype=str)["Id"].tolist() == BIG_IDS


SMALL = ["--data-root", "{tmp}/data", "--csv", "{tmp}/t.csv", "--cache-dir", "{tmp}/cache", "--image-size", "32",
         "--workers", "1", "--shard-size", "4"]  # 6 images in 2 shards


def damaged_cache(damage: Callable[[Path], None]) -> Callable[[dict], None]:
    """A small cache built by dataset.py, then damaged by damage(its folder)."""
    def prepare(paths: dict) -> None:
        root = Path(paths["tmp"]) / "data"
        write_csv(root, copy_images(Path(paths["root"]), root, 6))
        dataset.main(fill(SMALL, paths))
        [folder] = (Path(paths["tmp"]) / "cache").iterdir()
        damage(folder)
    return prepare


def cache_whole(notice: str) -> Callable:
    """A check: dataset.py said `notice` (the damage found), the cache is whole again (6 ok), and
    reading it back finds every image."""
    def check(paths, out, err, caught) -> None:
        assert notice in err and "(6 ok, 0 missing or unreadable)" in out and not caught, (out, err, caught)
        [folder] = (Path(paths["tmp"]) / "cache").iterdir()
        again = cache.ImageCache(folder)
        assert not again.missing_shards() and again.status()[0].all() and len(again) == 6
    return check


def fifo_image(paths: dict) -> None:
    root = Path(paths["tmp"]) / "data"
    images = copy_images(Path(paths["root"]), root, 4)
    fifo = "train/pid1/study1/view1_frontal.jpg"
    (root / fifo).parent.mkdir(parents=True)
    os.mkfifo(root / fifo)  # opening it for reading would wait for a writer, forever
    write_csv(root, [*images, fifo])


def fifo_skipped(paths, out, err, caught) -> None:
    assert "(4 ok, 1 missing or unreadable)" in out, out
    assert any("train/pid1/study1/view1_frontal.jpg (unreadable (not a regular file: a FIFO))" in w for w in caught)


ISSUE_CASES = {
    # outputs never overwrite inputs, never land under the data root
    "submission --out is the test CSV": Case(
        "make_submission.py", ["--test-csv", "{tmp}/test.csv", "--out", "{tmp}/test.csv"],
        Refused(("--out {tmp}/test.csv: is the run's input --test-csv",), unchanged=("{tmp}/test.csv",)),
        copy_test_csv),
    "submission --out is the training CSV (under the data root)": Case(
        "make_submission.py", ["--out", "{root}/student_labels/train2023.csv"],
        Refused(("--out {root}/student_labels/train2023.csv: lies under the data root {root}",),
                unchanged=("{root}/student_labels/train2023.csv",))),
    "submission --out is the training CSV given as --labels": Case(
        "make_submission.py", ["--labels", "{tmp}/train.csv", "--out", "{tmp}/train.csv"],
        Refused(("--out {tmp}/train.csv: is the run's input --labels",), unchanged=("{tmp}/train.csv",)),
        copy_train_csv),
    "submission --out is a checkpoint": Case(
        "make_submission.py", ["--out", "{ckpt}"],
        Refused(("--out {ckpt}: is the run's input --checkpoints (cardiomegaly/best.pt)",), unchanged=("{ckpt}",))),
    "submission --out under the data root": Case(
        "make_submission.py", ["--out", "{root}/x.csv"],
        Refused(("--out {root}/x.csv: lies under the data root",), unchanged=("{root}/x.csv",))),
    "submission --plots under the data root": Case(
        "make_submission.py", ["--test-csv", "{root}/student_labels/test_labels.csv", "--labels",
                               "{root}/student_labels/test_labels.csv", "--plots", "{root}/plots"],
        Refused(("--plots {root}/plots: lies under the data root",), unchanged=("{root}/plots",))),
    "train --out-dir under the data root": Case(
        "train.py", ["--out-dir", "{root}/ckpts"],
        Refused(("--out-dir {root}/ckpts: lies under the data root",), unchanged=("{root}/ckpts",))),
    "train --cache-dir under the data root": Case(
        "train.py", ["--cache-dir", "{root}/cache"],
        Refused(("--cache-dir {root}/cache: lies under the data root",), unchanged=("{root}/cache",))),
    "dataset.py --cache-dir under the data root": Case(
        "dataset.py", ["--cache-dir", "{root}/cache"],
        Refused(("--cache-dir {root}/cache: lies under the data root",), unchanged=("{root}/cache",))),
    "train --out-dir read-only": Case(
        "train.py", ["--out-dir", "{tmp}/ro/ckpt"],
        Refused(("--out-dir {tmp}/ro/ckpt: cannot be written (Permission denied",), unchanged=("{tmp}/ro/ckpt",)),
        read_only),
    "gridsearch --out-dir read-only": Case(
        "gridsearch.py", ["--out-dir", "{tmp}/ro/grid"],
        Refused(("--out-dir {tmp}/ro/grid: cannot be written (Permission denied",), unchanged=("{tmp}/ro/grid",)),
        read_only),
    # runs are never erased by accident
    "a rerun over an interrupted run without --resume": Case(
        "train.py", [],
        Refused(("{tmp}/ckpt/cardiomegaly holds another run (last.pt): add --resume to carry it on, or --overwrite",),
                unchanged=("{tmp}/ckpt/cardiomegaly/last.pt",),
                needs_csv="the model folders are named after the pathologies the CSV has"),
        interrupted_run),
    "--resume with no last.pt": Case(
        "train.py", ["--resume"],
        Starts("--resume: no {tmp}/ckpt/cardiomegaly/last.pt yet: training cardiomegaly from the start",
               needs_csv="the model folders are named after the pathologies the CSV has")),
    "--resume and --overwrite at once": Case(
        "train.py", ["--resume", "--overwrite"],
        Refused(("--resume carries a run on, --overwrite starts it again: give one",))),
    # values: seeds, bad CSVs, config files, devices
    "--seed beyond numpy's range": Case(
        "train.py", ["--seed", "99999999999"], Refused(("--seed must be between 0 and 4294967295, got 99999999999",))),
    "--seed -1 from a --config file": Case(
        "train.py", ["--config", "{tmp}/c.yaml"],
        Refused(("--seed must be between 0 and 4294967295, got -1 (set in --config {tmp}/c.yaml)",)),
        config_file("seed: -1\n")),
    "--fold without --folds": Case("train.py", ["--fold", "1"], Refused(("--fold needs --folds K",))),
    "--device cuda without a GPU": Case(
        "train.py", ["--device", "cuda"], Refused(("--device cuda: no CUDA device is visible",)), no_cuda),
    "a CSV cut short mid-row": Case(
        "train.py", ["--train-csv", "{tmp}/cut.csv"],
        Refused(("{tmp}/cut.csv: line 11: ", "(a row cut short?)"), needs_csv="it is the CSV"), cut_mid_row),
    "a column named twice": Case(
        "train.py", ["--train-csv", "{tmp}/dup.csv"],
        Refused(("{tmp}/dup.csv: line 1: column 'Cardiomegaly' appears twice",), needs_csv="it is the CSV"),
        column_twice),
    "test Ids beyond 2^53 and int64": Case(
        "make_submission.py", ["--test-csv", "{tmp}/test.csv"], Accepted(ids_unchanged), big_ids),
    # caches: damaged sidecars are rebuilt, never a traceback or wrong pixels
    "a cache shard's status json cut short": Case(
        "dataset.py", SMALL, Accepted(cache_whole("rebuilding 1 of 2 shards")),
        damaged_cache(lambda f: (f / "shard_00000.json").write_text((f / "shard_00000.json").read_text()[:30])),
        base=False),
    "a cache meta.json of {}": Case(
        "dataset.py", SMALL, Accepted(cache_whole("meta.json: cache index without")),
        damaged_cache(lambda f: (f / "meta.json").write_text("{}")),
        base=False),
    "a FIFO named as an image": Case(
        "dataset.py", SMALL, Accepted(fifo_skipped), fifo_image, base=False),
    # found while training: the line says what is true
    "--lr 1e12 before any last.pt": Case(
        "train.py", ["--lr", "1e12"],
        Refused(("the training loss is not finite in epoch 1", "lower --lr"), work=True, not_says="keeps")),
}


def snapshot(path: str) -> bytes | None:
    p = Path(path)
    return p.read_bytes() if p.is_file() else (b"<folder>" if p.exists() else None)


def on_alarm(signum, frame):
    raise TimeoutError("the run hangs")


@pytest.mark.parametrize("name", ISSUE_CASES)
def test_the_issues_bad_inputs(name, paths, request, capsys):
    case = ISSUE_CASES[name]
    if case.prepare is not None:
        case.prepare(paths)
    o = case.outcome
    argv = fill((BASE[case.script] if case.base else []) + case.argv, paths)
    if not (isinstance(o, Accepted) or (isinstance(o, Refused) and o.work)):
        request.getfixturevalue("no_work")["csv"] = o.needs_csv is not None
    unchanged = fill(list(o.unchanged), paths) if isinstance(o, Refused) else []
    before = {p: snapshot(p) for p in unchanged}
    if isinstance(o, Starts):
        with pytest.raises(Reached):
            run(case.script, argv, capsys)
        assert o.says.format(**paths) in capsys.readouterr().out
        return
    previous, threads = signal.signal(signal.SIGALRM, on_alarm), torch.get_num_threads()
    signal.alarm(60)  # a read that blocks (a FIFO) fails the test instead of hanging it
    torch.set_num_threads(1)  # on a CPU shared with other jobs, two threads waiting on each other are 10x slower
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = run(case.script, argv, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(threads)
    if isinstance(o, Accepted):
        assert code == 0 and "Traceback" not in err and "error:" not in err, err
        o.check(paths, out, err, [str(w.message) for w in caught])
        return
    line = one_error_line(code, err, *(s.format(**paths) for s in o.says))
    assert o.not_says is None or o.not_says not in line, line
    assert {p: snapshot(p) for p in unchanged} == before
