"""common/cli.py: presets set defaults before the command line is read; a flag you give always wins."""

import dataclasses
import math
from typing import Literal, Optional

import pytest
import tyro

from common import cli


@dataclasses.dataclass(frozen=True)
class Inner:
    n: int = 100
    """samples"""
    shuffle: bool = True
    """shuffle"""


@dataclasses.dataclass(frozen=True)
class Toy:
    stage: tyro.conf.Positional[Literal["miniature", "train"]] = "miniature"
    """what to run"""
    preset: Optional[Literal["smoke", "miniature", "paper"]] = None
    """preset"""
    lr: float = 1e-6
    """learning rate (the paper's)"""
    steps: int = 10000
    """steps (the paper's)"""
    inner: Inner = Inner()
    """nested knobs"""


PRESETS = {"smoke": {"steps": 2, "inner.n": 4, "inner.shuffle": False}, "miniature": {"lr": 1e-4, "steps": 120},
           "paper": {}}


def test_the_stage_picks_the_preset_and_a_given_flag_wins_even_at_the_papers_value():
    assert cli.parse(Toy, [], PRESETS) == Toy(preset="miniature", lr=1e-4, steps=120)
    assert cli.parse(Toy, ["train"], PRESETS) == Toy(stage="train", preset="paper")
    assert cli.parse(Toy, ["--lr", "1e-6"], PRESETS).lr == 1e-6  # the paper's value, given: it wins
    assert cli.parse(Toy, ["--preset", "smoke", "--inner.n", "7"], PRESETS) == Toy(
        preset="smoke", steps=2, inner=Inner(n=7, shuffle=False))
    assert cli.parse(Toy, ["train", "--preset", "miniature"], PRESETS).steps == 120
    assert cli.parse(Toy, [], PRESETS, default_preset=lambda args: "smoke").steps == 2


def test_presets_name_only_fields_and_show_as_flags():
    with pytest.raises(KeyError, match=r"\['stepz'\]"):
        cli.with_values(Toy(), {"stepz": 3})
    text = cli.preset_help(PRESETS)
    assert "smoke: --steps 2 --inner.n 4 --inner.no-shuffle" in text and "paper: no change" in text
    assert text.startswith("defaults for this run (a flag you give always wins); default: miniature for the "
                           "miniature stage, paper for the others.")


@dataclasses.dataclass
class Ranged:
    batch_size: int = 8
    lr: float = 1e-3
    top_p: float = 0.9
    sizes: tuple[int, ...] = (4, 8)
    inner: Toy = dataclasses.field(default_factory=Toy)


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"sizes": (4, 0)}, r"--sizes must be at least 1, got \(4, 0\)"),
    ({"lr": 0.0}, "--lr must be a positive number, got 0.0"),
    ({"lr": math.nan}, "--lr must be a positive number, got nan"),
    ({"lr": math.inf}, "--lr must be a positive number, got inf"),
    ({"top_p": 1.5}, r"--top-p must be in \[0, 1\], got 1.5"),
    ({"inner": Toy(steps=0)}, "--inner.steps must be at least 1, got 0")])
def test_check_ranges_names_the_flag_out_of_range(change, message):
    rules = dict(at_least={"batch_size": 1, "sizes": 1, "inner.steps": 1}, positive=("lr",), fractions=("top_p",))
    cli.check_ranges(Ranged(), **rules)  # the defaults are in range
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        cli.check_ranges(dataclasses.replace(Ranged(), **change), **rules)
