"""Claims against the seeds' spread: the one verdict rule that reproduce.py and the experiments use.

A claim says mean(a) > mean(b) (or <, or >= for "a is not worse than b"). Its verdict over seeds:
"held" when the difference has the claimed sign and exceeds the sum of the two standard deviations,
"reversed" when it has the opposite sign by as much, "within seed spread" otherwise. With one seed
there is no spread to judge a difference against, so there is no verdict: "1 seed: no verdict".

With one seed and the per-item values of both arms on the same test items, `paired_bootstrap` judges the
difference against the test set's own noise instead: the items are resampled with replacement (the same
draw for both arms, so what the items share cancels), and the verdict follows the 95% percentile interval of
the difference (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13). That interval covers
which test items happened to be drawn, not what another seed would train: it says nothing of seed-to-seed
variance, which only `--seeds 3` measures.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

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


def as_array_if_numeric(items: Sequence[Any]) -> np.ndarray | list:
    """The items as one numeric array where they are numbers of one shape (per-image pixel counts, [kept, total]
    pairs), else as a list (captions; rows with None for a task an image is not in)."""
    try:
        array = np.asarray(items)
    except ValueError:  # ragged
        return list(items)
    return array if array.dtype.kind in "biuf" else list(items)


def paired_bootstrap(a_items: Sequence[Any], b_items: Sequence[Any], claim: Relation, resamples: int = 1000,
                     seed: int = 0, statistic: Callable[[list], float] | None = None) -> dict:
    """One seed's verdict on `claim` from the two arms' per-item values on the same test items.

    `statistic` turns a resample of one arm's items into its number (default: the mean of numbers; a
    corpus-level metric such as distinct words takes the items themselves). Returns the verdict ("held on
    this seed" / "reversed on this seed" / "within test-set noise"), the observed difference in the claimed
    direction and its 95% interval over `resamples` paired resamples (seeded: the same call, the same answer).
    """
    if len(a_items) != len(b_items) or len(a_items) < 2:
        raise ValueError(f"a paired bootstrap needs the same test items (at least 2) under both arms, got "
                         f"{len(a_items)} and {len(b_items)}")
    n = len(a_items)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # row r: the items of resample r
    if statistic is None:
        a, b = np.asarray(a_items, dtype=float), np.asarray(b_items, dtype=float)
        observed = a.mean() - b.mean()
        differences = a[draws].mean(axis=1) - b[draws].mean(axis=1)
    else:
        a, b = as_array_if_numeric(a_items), as_array_if_numeric(b_items)  # numbers: resampled by indexing, not lists
        pick = lambda items, rows: items[rows] if isinstance(items, np.ndarray) else [items[i] for i in rows]  # noqa: E731
        observed = statistic(a) - statistic(b)
        differences = np.array([statistic(pick(a, rows)) - statistic(pick(b, rows)) for rows in draws])
    sign = -1.0 if claim == "<" else 1.0  # "a < b" is "b - a > 0"
    low, high = np.percentile(sign * differences, [2.5, 97.5])
    if claim == ">=":  # "a is not worse than b": reversed only when the whole interval says a is worse
        outcome = "reversed on this seed" if high < 0 else "held on this seed"
    else:
        outcome = "held on this seed" if low > 0 else "reversed on this seed" if high < 0 else "within test-set noise"
    return {"verdict": outcome, "difference": float(sign * observed), "interval": [float(low), float(high)],
            "items": n, "resamples": resamples}
