"""Run configurations in YAML: `--config FILE.yaml` sets a script's flags, and a run's settings are
written back as `args.yaml`, itself a valid `--config` (timm's train.py does the same round trip).

A config file is a mapping of flag names (`image-size` or `image_size`) to values as they would be
typed: `lr: 3.0e-4`, `pathology: [Cardiomegaly, Edema]`, `amp: false`, `weights: none`; `null`
leaves the flag at its default. A mapping value (`uncertain: {Atelectasis: ones, default: keep}`)
is read as `NAME=VALUE,...`. Flags given on the command line win over the file. A file that is not
YAML, not a mapping, a key that is not a flag of the script, or a bad value stops in one line that
names the file and the key.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from common import UserError, may_change, write_text

# flags that say how this command runs, not what the run is: never written to args.yaml
NOT_SETTINGS = ("help", "config", "resume", "overwrite")


def add_config_flag(p: argparse.ArgumentParser) -> None:
    may_change(p.add_argument("--config", type=Path, metavar="FILE.yaml",
                              help="YAML file of flag values (keys are flag names; the command line wins); every "
                              "run folder's args.yaml is one"))


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """p.parse_args(argv) with --config FILE.yaml applied first (its values become the defaults, so
    the command line wins) and `--flag=--` refused (argparse would pass [] for it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for token in argv:
        if re.fullmatch(r"--[\w-]+=--", token):
            p.error(f"argument {token.split('=')[0]}: expected a value, got '--'")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        try:
            values = read_config(known.config, p)
        except UserError as e:
            p.error(str(e))
        for a in p._actions:
            if a.dest in values:
                a.required = False
        p.set_defaults(**values)
        if hasattr(p, "config_source"):
            p.config_source = (known.config, values, argv)
    return p.parse_args(argv)


def flag_actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every optional flag of p (not --help)."""
    return {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}


def long_flag(action: argparse.Action) -> str:
    """The flag's first '--' spelling ('--log' of '--log/--live-log'), else its only one."""
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def flag_names(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a config key may use (the dest, and each long flag as written, '-' as '_') -> action."""
    names = {}
    for dest, action in flag_actions(p).items():
        if action.nargs != 0:  # a switch's --no-NAME is not a key: NAME: false is
            names.update({o.lstrip("-").replace("-", "_"): action for o in action.option_strings if o.startswith("--")})
        names[dest] = action
    return names


def read_config(path: Path, p: argparse.ArgumentParser, others: argparse.ArgumentParser | None = None) -> dict:
    """The flag values of a config file for parser p, converted as the command line would convert
    them: dest -> value. With `others` (a script that passes the rest on, as gridsearch passes
    training flags), keys of that parser are accepted too and returned under their own dests."""
    try:
        import yaml
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--config {path}: cannot be read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not YAML ({' '.join(str(e).split())})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: not a mapping of flag names to values (it holds a {type(data).__name__})")
    mine, theirs = flag_names(p), flag_names(others) if others is not None else {}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        action = mine.get(name) or theirs.get(name)
        dest = action.dest if action is not None else name
        if action is None or dest == "config":
            raise UserError(f"--config {path}: {key!r} is not a flag of {Path(p.prog).name}")
        if value is None:
            continue
        try:
            out[dest] = convert(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise UserError(f"--config {path}: {key}: {value!r} is not a valid value ({e})") from e
    return out


def to_argv(values: dict, p: argparse.ArgumentParser) -> list[str]:
    """Command-line tokens that give parser p these values (dest -> value, as read_config returns
    them): how a script that passes flags on (gridsearch.py to train.main) hands over a config file's
    values. Single values are written `--flag=VALUE`, so one that starts with '-' stays a value."""
    actions, argv = flag_actions(p), []
    token = lambda v: repr(v) if isinstance(v, float) else str(v)  # repr: a float round-trips exactly
    for dest, value in values.items():
        action = actions[dest]
        flag = long_flag(action)
        if isinstance(action, argparse.BooleanOptionalAction):  # --flag / --no-flag
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif action.nargs == 0:  # store_true and the like: present or not
            argv += [flag] if value == action.const else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(token, value)]
        else:
            argv.append(f"{flag}={token(value)}")
    return argv


def convert(action: argparse.Action, value):
    """A YAML value as the command line would give it for this flag."""
    if action.nargs == 0:  # switches: --flag / --no-flag
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items and action.default != []:
            raise ValueError("a list of at least one value")
        return [_scalar(action, v) for v in items]  # [] where the flag's default is [] (args.yaml writes it)
    if isinstance(value, list):
        raise ValueError("one value, not a list")
    return _scalar(action, value)


def _scalar(action: argparse.Action, value):
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, dict)):
        raise ValueError("a single value")
    text = value if isinstance(value, str) else ("true" if value is True else "false" if value is False else str(value))
    out = action.type(text) if callable(action.type) else text
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return out


def settings(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    """The run's settings as args.yaml holds them: flag name -> value, every flag of p that is not
    about this command alone (NOT_SETTINGS), in the parser's order."""
    out = {}
    for dest, action in flag_actions(p).items():
        if dest in NOT_SETTINGS or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        out[long_flag(action).lstrip("-") if action.nargs != 0 else dest.replace("_", "-")] = _plain(value)
    return out


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_args_yaml(path: Path, args: argparse.Namespace, p: argparse.ArgumentParser, **changes) -> None:
    """OUT/args.yaml: settings(args, p), with `changes` (flag dest -> value) applied; atomic."""
    import yaml
    values = settings(argparse.Namespace(**{**vars(args), **changes}), p)
    write_text(path, yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=120))
