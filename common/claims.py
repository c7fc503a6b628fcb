"""Claims against the seeds' spread: the one verdict rule that reproduce.py and the paper files use.

A claim says mean(a) > mean(b) (or <, or >= for "a is not worse than b"). Its verdict over seeds:
"held" when the difference has the claimed sign and exceeds the sum of the two standard deviations,
"reversed" when it has the opposite sign by as much, "within seed spread" otherwise. With one seed
there is no spread: the sign decides, and the verdict says "(1 seed)".
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

Relation = Literal[">", "<", ">="]


def verdict(a: Sequence[float], b: Sequence[float], claim: Relation) -> str:
    """Whether mean(a) `claim` mean(b) holds, judged against the seeds' spread (see the module docstring).

    `>=` ("a is not worse than b") holds unless a falls below b by more than the spread.
    """
    difference = float(np.mean(a) - np.mean(b))
    if claim == "<":
        difference = -difference
    spread = float(np.std(a) + np.std(b))
    one_seed = " (1 seed)" if min(len(a), len(b)) == 1 else ""
    if claim == ">=":
        return ("held" if difference >= -spread else "reversed") + one_seed
    if difference > spread:
        return "held" + one_seed
    if difference < -spread:
        return "reversed" + one_seed
    return "within seed spread"


def mean_spread(values: Sequence[float], digits: int = 2) -> str:
    """'m ± s' over seeds (population std), or 'm' for one seed."""
    text = f"{np.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {np.std(values):.{digits}f}"
