"""common/cli.py: presets set defaults before the command line is read; a flag you give always wins."""

import dataclasses
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
