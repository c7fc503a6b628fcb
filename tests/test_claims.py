"""common/claims.py: the one-seed paired bootstrap on hand-made samples."""

import numpy as np
import pytest

from common.claims import as_array_if_numeric, paired_bootstrap


def test_a_clear_gain_holds_and_its_mirror_is_reversed():
    a, b = [1.0] * 40 + [0.0] * 10, [0.0] * 40 + [1.0] * 10  # a wins 40 items, b 10: difference +0.6
    result = paired_bootstrap(a, b, ">")
    assert result["verdict"] == "held on this seed" and result["difference"] == pytest.approx(0.6)
    assert 0 < result["interval"][0] < 0.6 < result["interval"][1] and result["items"] == 50
    assert paired_bootstrap(b, a, ">")["verdict"] == "reversed on this seed"
    assert paired_bootstrap(b, a, "<")["verdict"] == "held on this seed"  # "b < a" is the same claim as "a > b"
    assert paired_bootstrap(b, a, "<")["interval"] == result["interval"]


def test_a_difference_inside_the_noise_has_no_verdict_either_way():
    a = [1.0, 0.0] * 15
    b = [0.0] + a[1:]  # a wins one item of 30: a resample misses it with probability (29/30)^30 = 36%
    result = paired_bootstrap(a, b, ">")
    assert result["verdict"] == "within test-set noise" and result["difference"] == pytest.approx(1 / 30)
    assert result["interval"][0] == 0 < result["interval"][1]


def test_pairing_cancels_what_the_items_share():
    """Item difficulty varies hugely, a beats b by exactly 1 on every item: unpaired, the noise would swamp it."""
    difficulty = np.linspace(0, 100, 25)
    result = paired_bootstrap(difficulty + 1, difficulty, ">")
    assert result["interval"] == pytest.approx([1.0, 1.0]) and result["verdict"] == "held on this seed"


def test_not_worse_than_is_reversed_only_when_the_whole_interval_is_worse():
    same = [0.5, 0.7, 0.2, 0.9] * 5
    assert paired_bootstrap(same, same, ">=")["verdict"] == "held on this seed"
    assert paired_bootstrap([x - 1 for x in same], same, ">=")["verdict"] == "reversed on this seed"


def test_the_interval_is_the_percentiles_of_the_seeded_resamples_by_hand():
    a, b = [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]
    draws = np.random.default_rng(7).integers(0, 3, size=(200, 3))
    by_hand = np.percentile(np.array(a)[draws].mean(1) - np.array(b)[draws].mean(1), [2.5, 97.5])
    result = paired_bootstrap(a, b, ">", resamples=200, seed=7)
    assert result["interval"] == pytest.approx(list(by_hand)) and result == paired_bootstrap(a, b, ">", 200, 7)


def test_a_corpus_statistic_is_recomputed_on_each_resample():
    """Distinct words: not a mean over items; the statistic sees each resample's captions."""
    distinct = lambda captions: len({w for c in captions for w in c.split()})  # noqa: E731
    rich = [f"a {w} b" for w in "red green blue pink gray teal".split()]
    poor = ["a red b"] * 6
    result = paired_bootstrap(rich, poor, ">", statistic=distinct)
    assert result["difference"] == 8 - 3 and result["verdict"] == "held on this seed"


def test_unpaired_or_single_items_are_refused():
    with pytest.raises(ValueError, match="same test items"):
        paired_bootstrap([1.0, 2.0], [1.0], ">")
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap([1.0], [1.0], ">")


def test_numeric_items_are_resampled_as_one_array_and_others_as_lists():
    assert isinstance(as_array_if_numeric([[1, 2], [3, 4]]), np.ndarray)  # [kept, total] pairs
    assert as_array_if_numeric([[1.0, None], [None, 2.0]]) == [[1.0, None], [None, 2.0]]  # a task an image is not in
    assert as_array_if_numeric(["a red circle", "a cross"]) == ["a red circle", "a cross"]
    assert as_array_if_numeric([[1, 2], [3]]) == [[1, 2], [3]]  # ragged
    pairs_a, pairs_b = [[1, 2], [2, 2], [0, 1], [1, 1]], [[0, 2], [1, 2], [0, 1], [1, 1]]
    ratio = lambda items: float(np.sum(items, axis=0)[0] / np.sum(items, axis=0)[1])  # noqa: E731
    as_arrays = paired_bootstrap(pairs_a, pairs_b, ">", statistic=ratio)
    labelled = lambda pairs: [pair + ["image"] for pair in pairs]  # noqa: E731  # a string in each: resampled as lists
    as_lists = paired_bootstrap(labelled(pairs_a), labelled(pairs_b), ">",
                                statistic=lambda items: ratio([[int(i[0]), int(i[1])] for i in items]))
    assert as_arrays == as_lists and as_arrays["difference"] == pytest.approx(4 / 6 - 2 / 6)
