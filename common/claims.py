"""Claims against the seeds' spread: the one verdict rule that reproduce.py and the paper files use.

A claim says mean(a) > mean(b) (or <, or >= for "a is not worse than b"). Its verdict over seeds:
"held" when the difference has the claimed sign and exceeds the sum of the two standard deviations,
"reversed" when it has the opposite sign by as much, "within seed spread" otherwise. With one seed
there is no spread to judge a difference against, so there is no verdict: "1 seed: no verdict".
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

Relation = Literal[">", "<", ">="]


def verdict(a: Sequence[float], b: Sequence[float], claim: Relation) -> str:
    """Whether mean(a) `claim` mean(b) holds, judged against the seeds' spread (see the module docstring).

    `>=` ("a is not worse than b") holds unless a falls below b by more than the spread.
    """
    if min(len(a), len(b)) < 2:
        return "1 seed: no verdict"
    difference = float(np.mean(a) - np.mean(b))
    if claim == "<":
        difference = -difference
    spread = float(np.std(a) + np.std(b))
    if claim == ">=":
        return "held" if difference >= -spread else "reversed"
    if difference > spread:
        return "held"
    if difference < -spread:
        return "reversed"
    return "within seed spread"


def reason(a: Sequence[float], b: Sequence[float], claim: Relation) -> str:
    """One line of why a verdict is what it is: the difference in the claimed direction against the seeds' spread."""
    if min(len(a), len(b)) < 2:
        return "one seed has no spread to judge a difference against"
    difference = float(np.mean(a) - np.mean(b)) * (-1 if claim == "<" else 1)
    spread = float(np.std(a) + np.std(b))
    return f"difference {difference:+.3g} in the claimed direction against a seed spread of {spread:.3g}"


def mean_spread(values: Sequence[float], digits: int = 2) -> str:
    """'m ± s' over seeds (population std), or 'm' for one seed."""
    text = f"{np.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {np.std(values):.{digits}f}"
