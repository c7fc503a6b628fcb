"""One command-line convention for the five paper files: the stage, then flags (`dico.py xe --seeds 3`).

A paper file's `Args` holds the paper's values as defaults. Its presets, written out in the file as
`PRESETS = {"smoke": {...}, "miniature": {...}, "paper": {}}`, change some of them:

- `--preset smoke`: every stage of the miniature run in under a minute on 2 CPU cores;
- `--preset miniature`: the miniature world's budget (the default of the miniature stage);
- `--preset paper`: the paper's values (the default of every other stage), in files whose miniature
  values differ from the paper's; elsewhere the defaults are the paper's where the paper states them,
  and the miniature stage sizes its own models.

The preset sets the defaults before the command line is read, so a flag you give always wins (also
when it equals the paper's value), and `--help` shows the values that will run for that stage and
preset. Nested fields are named with dots, as on the command line: `"world.n_train": 64`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from typing import Callable, Mapping, Sequence, TypeVar

import tyro

from common.data import DEBUG_FLAG, without_debug

T = TypeVar("T")


def default_preset_of(stage: str, presets: Mapping[str, Mapping[str, object]]) -> str:
    """The preset a stage runs with when --preset is not given."""
    return "paper" if stage != "miniature" and "paper" in presets else "miniature"


def preset_help(presets: Mapping[str, Mapping[str, object]]) -> str:
    """The `--preset` flag's help: what each preset sets, as flags."""
    default = ("miniature for the miniature stage, paper for the others" if "paper" in presets else "miniature")
    lines = [f"defaults for this run (a flag you give always wins); default: {default}."]
    for name, values in presets.items():
        shown = " ".join(_as_flag(key, value) for key, value in values.items())
        lines.append(f"{name}: {shown or 'no change (the Args defaults)'}")
    return " | ".join(lines)


def _as_flag(key: str, value: object) -> str:
    """A preset's value as the command line would give it: `--steps 3`, `--sizes 16 64`, `--no-resume`."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        parent, dot, name = flag.rpartition(".")
        return f"--{flag}" if value else f"--{parent}{dot}no-{name}"
    if isinstance(value, (tuple, list)):
        return f"--{flag} " + " ".join(str(v) for v in value)
    return f"--{flag} {value}"


def with_values(args: T, values: Mapping[str, object]) -> T:
    """`args` with `values` set; a dotted key ("world.n_train") sets a field of a nested dataclass."""
    top: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    names = {f.name for f in dataclasses.fields(args)}
    unknown = sorted((set(top) | set(nested)) - names)
    if unknown:
        raise KeyError(f"preset names {unknown}, which are not fields of {type(args).__name__}")
    for head, inner in nested.items():
        top[head] = with_values(getattr(args, head), inner)
    return dataclasses.replace(args, **top)


def parse(args_type: type[T], argv: Sequence[str] | None, presets: Mapping[str, Mapping[str, object]],
          default_preset: Callable[[T], str] | None = None, description: str | None = None) -> T:
    """Read the command line of a paper file whose Args has `stage` and `preset` fields.

    The command line is read twice: once (help aside) for the stage and the preset, then with that
    preset's values as the defaults. `default_preset(args)` picks the preset when `--preset` is not
    given (default: default_preset_of).
    """
    argv = without_debug(sys.argv[1:] if argv is None else argv)  # run_command's flag
    description = (f"{description or inspect.getdoc(args_type)}\n\n"
                   f"{DEBUG_FLAG}: keep the traceback of an expected error.")
    first = tyro.cli(args_type, args=[word for word in argv if word not in ("-h", "--help")],
                     description=description)
    name = first.preset or (default_preset(first) if default_preset else default_preset_of(first.stage, presets))
    defaults = with_values(args_type(), {**presets[name], "stage": first.stage, "preset": name})
    return tyro.cli(args_type, args=argv, default=defaults, description=description)



def check_ranges(args, at_least: Mapping[str, float] | None = None, positive: Sequence[str] = (),
                 fractions: Sequence[str] = ()) -> None:
    """Every named flag in its range before anything loads, else one line naming the flag (exit status 1).

    `at_least`: {field: its lowest value} (counts: a batch of 0 images, 0 seeds; each item of a tuple field);
    `positive`: finite and > 0 (learning rates, temperatures); `fractions`: in [0, 1] (probabilities, top-p).
    A dotted name ("train.steps") is a nested field. NaN fails every test, so `--lr nan` is refused too.
    """
    def value(name: str):
        return functools.reduce(getattr, name.split("."), args)

    def refuse(name: str, what: str) -> SystemExit:
        return SystemExit(f"error: --{name.replace('_', '-')} must be {what}, got {value(name)}")

    for name, low in (at_least or {}).items():
        got = value(name)
        if not all(item >= low for item in (got if isinstance(got, (tuple, list)) else (got,))):
            raise refuse(name, f"at least {low}")
    for name in positive:
        if not 0 < value(name) < math.inf:
            raise refuse(name, "a positive number")
    for name in fractions:
        if not 0 <= value(name) <= 1:
            raise refuse(name, "in [0, 1]")
