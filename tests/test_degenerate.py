"""common/degenerate.py: hand-made captions both ways, the thresholds as keywords, the counter."""

import json

import pytest

from common.degenerate import (EMPTY, KINDS, LOOP, NON_ALPHABETIC, REPEATED_TOKEN, DegenerateCounter,
                               degenerate_reason, reason_kind)

# Real captions, some with legitimate repetition: none is degenerate
GOOD = [
    "a red car next to a red bus",
    "a dog and a dog and a cat on a sofa",
    "very very very tall building at night",
    "step by step by step instructions on a whiteboard",
    "New York, New York: the skyline at dusk",
    "the 2019 Ford F-150 at 1:30 pm",
    "A close-up of a bowl of ramen with an egg, green onions and two slices of pork.",
    "two by two, the ducks cross the road while a man in a blue coat waits with his dog",
    "Piggly Wiggly CLR Mold & Mildew Stain Remover coupon 44993",
    "red, green, blue, red, green, blue paint cans stacked on a shelf in a hardware store aisle",
    "iPhone 12 Pro Max 128GB",
    "一只猫坐在窗台上",  # no spaces: one token, judged by the empty and letter checks only
    "ok",
]

# (caption, the kind of degeneracy)
BAD = [
    ("", EMPTY),
    ("   \n\t ", EMPTY),
    ("...", EMPTY),
    (None, EMPTY),
    (42, EMPTY),
    # the CoCa failures of apple/ml-mobileclip-dr issue 4
    ("a 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2", REPEATED_TOKEN),
    ('fahad 2 2 2 2 tarafından logo design for " rmf consulting " için no 2 2', REPEATED_TOKEN),
    ("a 2 2 2 2 2", REPEATED_TOKEN),
    ("the the the the cat", REPEATED_TOKEN),
    ("dog dog cat dog bird dog", REPEATED_TOKEN),  # 'dog' is 4 of 6 words
    ("a man riding a horse a man riding a horse a man riding a horse", LOOP),
    ("a plate of food on a table, on a table, on a table, on a table, on a", LOOP),
    ("The image shows a brown dog. The dog is brown. The dog is brown. The dog is brown. The dog is", LOOP),
    ("## 1 2 3 4 5 6 7 8", NON_ALPHABETIC),
    ("0.0 0.0 0.1 0.3 x", NON_ALPHABETIC),
    ("3 x 4 = 12", NON_ALPHABETIC),
]


@pytest.mark.parametrize("caption", GOOD)
def test_real_captions_pass(caption):
    assert degenerate_reason(caption) is None


@pytest.mark.parametrize("caption,kind", BAD, ids=[repr(c)[:40] for c, _ in BAD])
def test_degenerate_captions_are_caught_with_their_kind(caption, kind):
    reason = degenerate_reason(caption)
    assert reason is not None and reason_kind(reason) == kind, reason
    assert reason.startswith(kind + ": ") and kind in KINDS


def test_reasons_say_what_repeats():
    assert degenerate_reason("a 2 2 2 2 2") == "repeated token: '2' 5 times in a row"
    reason = degenerate_reason("a man riding a horse a man riding a horse a man riding a horse")
    assert reason == "loop: 'a man riding a horse' 3 times in a row, 15 of 15 words"
    assert degenerate_reason("dog dog cat dog bird dog") == "repeated token: 'dog' is 4 of 6 words"


def test_thresholds_are_keywords():
    assert degenerate_reason("very very very tall", max_token_run=3) is not None
    assert degenerate_reason("a 2 2 2 2 2", max_token_run=6, max_token_share=1.0, min_alpha_fraction=0.0) is None
    # a phrase said twice is a loop only when asked for
    twice = "a cat on a mat a cat on a mat"
    assert degenerate_reason(twice) is None
    assert reason_kind(degenerate_reason(twice, min_loop_repeats=2)) == LOOP
    # a loop over a third of a long caption passes at the default coverage, not at a lower one
    caption = "a wide view of a busy harbour with boats cranes and a lighthouse " + "on the hill " * 3
    assert degenerate_reason(caption) is None
    assert reason_kind(degenerate_reason(caption, min_loop_coverage=0.3)) == LOOP
    assert degenerate_reason("3 x 4 = 12", min_alpha_fraction=0.1) is None
    with pytest.raises(TypeError):
        degenerate_reason("a", 3)  # thresholds are keyword-only


def test_counter_counts_kinds_examples_and_the_most_frequent_caption():
    counter = DegenerateCounter(examples_per_kind=2)
    captions = ["a red car", "", "a 2 2 2 2 2", "a 2 2 2 2 2 2", "a 2 2 2 2 2 2 2", "A red  car", "a red car"]
    reasons = [counter.check(c, sample=i) for i, c in enumerate(captions)]
    assert [r is None for r in reasons] == [True, False, False, False, False, True, True]
    summary = counter.summary()
    assert summary["checked"] == 7 and summary["degenerate"] == 4
    assert summary["by_kind"] == {EMPTY: 1, REPEATED_TOKEN: 3}
    assert [e[0] for e in summary["examples"][REPEATED_TOKEN]] == ["2", "3"]  # two kept of three
    assert summary["most_common"][0] == ["a red car", 3]  # case and spaces do not make another caption
    json.dumps(summary)  # goes into a stage's JSON as it is
    line = counter.line("generated captions")
    assert line.startswith("4 of 7 generated captions degenerate, dropped (empty 1, repeated token 3)")
    assert "'a red car', 3 times" in line
    assert DegenerateCounter().line() == "0 of 0 captions degenerate"


def test_counter_thresholds_and_merge_across_ranks():
    strict = DegenerateCounter(thresholds={"max_token_run": 3})
    assert strict.check("very very very tall") is not None
    rank0, rank1 = DegenerateCounter(), DegenerateCounter()
    for caption in ["a dog", "a 2 2 2 2", "a dog"]:
        rank0.check(caption)
    for caption in ["", "a dog", "a cat"]:
        rank1.check(caption)
    merged = rank0.merge(json.loads(json.dumps(rank1.summary())))
    assert merged.checked == 6 and merged.degenerate == 2
    assert merged.summary()["by_kind"] == {EMPTY: 1, REPEATED_TOKEN: 1}
    assert merged.most_common() == ("a dog", 3)


def test_counter_memory_is_bounded():
    counter = DegenerateCounter(max_distinct=3)
    for i in range(10):
        counter.check(f"caption number {'abcdefghij'[i]}")
    counter.check("caption number a")
    assert len(counter.seen) == 3 and counter.most_common() == ("caption number a", 2)
