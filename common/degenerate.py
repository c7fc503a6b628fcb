"""A guard against degenerate generated captions, for every stage that writes captions.

Captioners and LLM rewriters fail in a few recognisable ways, and a failed caption written to a
manifest trains the next model on garbage without any error. The known ones:

- an empty or blank output (an EOS as the first token, a prompt echo stripped away);
- one token repeated, as open_clip CoCa captions for DataCompDR-style data, "a 2 2 2 2 2 ..." and
  "fahad 2 2 2 2 ..." (apple/ml-mobileclip-dr issue 4);
- a phrase or sentence looping until the token budget ends ("on a table, on a table, on a ...");
- output that is mostly digits and symbols ("## 1 2 3 ...", "...", "0.0 0.0").

`degenerate_reason(caption)` says which, or None for a usable caption. It is a pure function of the
text, with every threshold a keyword argument, so a stage can drop or flag a caption and count why
(`DegenerateCounter`). Legitimate repetition passes: "a red car next to a red bus", "very very
tall", "a dog and a dog and a cat" repeat something at most twice or three times in a row.

One failure is no property of a single caption: a captioner that writes the same caption for every
image (mlfoundations/open_clip issue 797, a fine-tuned CoCa). The counter keeps the most frequent
caption of a stage, so that its log line shows it.

Tokens are the caption's words (runs of `\\w`, inner `.` or `'` kept: "0.5", "don't"; lowercased;
other punctuation ignored), so the repetition checks are meant for whitespace-delimited languages:
a caption in a script written without spaces is one long token to them, judged by the empty and
non-alphabetic checks only (str.isalpha counts CJK characters as letters).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# The kinds of degeneracy: every reason starts with one of them and ": " (reason_kind takes it back)
EMPTY = "empty"
REPEATED_TOKEN = "repeated token"
LOOP = "loop"
NON_ALPHABETIC = "non-alphabetic"
KINDS = (EMPTY, REPEATED_TOKEN, LOOP, NON_ALPHABETIC)

WORD = re.compile(r"\w+(?:[.'’]\w+)*")  # a word, a number such as 0.5, a contraction: one token


def _longest_periodic_span(tokens: list[str], period: int) -> tuple[int, int]:
    """(start, length) of the longest stretch of `tokens` that repeats with `period` (tokens[i] == tokens[i +
    period] throughout); its length counts the first copy, so a phrase said k times has length k * period."""
    best_start, best_len, run = 0, 0, 0
    for i in range(len(tokens) - period):
        run = run + 1 if tokens[i] == tokens[i + period] else 0
        if run + period > best_len:
            best_start, best_len = i - run + 1, run + period
    return best_start, (best_len if best_len > period else 0)


def degenerate_reason(caption: Any, *,
                      max_token_run: int = 4,
                      max_token_share: float = 0.5,
                      min_tokens_for_share: int = 6,
                      min_loop_repeats: int = 3,
                      min_loop_coverage: float = 0.5,
                      max_loop_period: int = 32,
                      min_alpha_fraction: float = 0.4) -> str | None:
    """Why `caption` is degenerate ("kind: detail", the kind one of KINDS), or None when it is usable.

    Checked in this order (the first that applies is the reason):
      empty           not a string, or nothing but whitespace and punctuation (no word at all);
      repeated token  one word `max_token_run` or more times in a row ("2 2 2 2": 4 is the default; "very very
                      very" is 3 and passes), or one word more than `max_token_share` of all words once the
                      caption has at least `min_tokens_for_share` (the default 6: "the cat the the dog the"
                      is 4 of 6; in a real caption even "a" rarely passes a third);
      loop            a phrase of 2 to `max_loop_period` words said `min_loop_repeats` or more times in a row
                      (3: "step by step by step" and "a dog and a dog and a cat" say theirs twice), the loop
                      covering at least `min_loop_coverage` of the caption's words (half: a long dense
                      caption whose second half is a loop is mostly loop; a list that repeats a pair three
                      times inside a long sentence is not flagged);
      non-alphabetic  fewer than `min_alpha_fraction` of the caption's non-space characters are letters (0.4:
                      "the 2019 Ford F-150 at 1:30 pm" is 0.5 and passes, "a 2 2 2 2 2" or "0.0 0.0 0.0"
                      is far below).
    """
    if not isinstance(caption, str):
        return f"{EMPTY}: not a string ({type(caption).__name__})"
    tokens = WORD.findall(caption.lower())
    if not tokens:
        return f"{EMPTY}: {'blank' if not caption.strip() else 'no word in ' + repr(caption[:40])}"

    run, longest, longest_token = 1, 1, tokens[0]
    for previous, token in zip(tokens, tokens[1:]):
        run = run + 1 if token == previous else 1
        if run > longest:
            longest, longest_token = run, token
    if longest >= max_token_run:
        return f"{REPEATED_TOKEN}: {longest_token!r} {longest} times in a row"
    if len(tokens) >= min_tokens_for_share:
        token, count = Counter(tokens).most_common(1)[0]
        if count / len(tokens) > max_token_share:
            return f"{REPEATED_TOKEN}: {token!r} is {count} of {len(tokens)} words"

    for period in range(2, min(max_loop_period, len(tokens) // min_loop_repeats) + 1):
        start, length = _longest_periodic_span(tokens, period)
        if length >= min_loop_repeats * period and length / len(tokens) >= min_loop_coverage:
            phrase = " ".join(tokens[start:start + period])
            return (f"{LOOP}: {phrase!r} {length / period:.3g} times in a row, "
                    f"{length} of {len(tokens)} words")

    visible = [c for c in caption if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters / len(visible) < min_alpha_fraction:
        return f"{NON_ALPHABETIC}: {letters} letters in {len(visible)} characters"
    return None


def reason_kind(reason: str) -> str:
    """The kind (one of KINDS) that a reason of `degenerate_reason` starts with."""
    return reason.split(":", 1)[0]


@dataclass
class DegenerateCounter:
    """How many captions a stage checked, how many were degenerate and why, and the first few of each kind.

    A stage calls `check(caption, sample)` on every caption it generates and drops or flags the caption when
    a reason comes back; at the end `line()` is its one log line and `summary()` goes into its JSON. Ranks
    each keep one and `merge` the others' summaries.
    """

    thresholds: dict = field(default_factory=dict)  # keyword arguments of degenerate_reason
    examples_per_kind: int = 3
    checked: int = 0
    by_kind: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # kind -> [[sample, caption cut at 80 characters, reason], ...]
    # Exact captions (stripped, lowercased) counted to find one written for many images; past `max_distinct`
    # different ones, new captions are no longer added (the counts of those already seen go on), so memory is
    # bounded and a caption that repeats from the start is still found.
    max_distinct: int = 100_000
    seen: Counter = field(default_factory=Counter)

    def check(self, caption: Any, sample: Any = None) -> str | None:
        """degenerate_reason(caption), counted; the reason, or None for a usable caption."""
        self.checked += 1
        if isinstance(caption, str) and caption.strip():
            text = " ".join(caption.lower().split())
            if text in self.seen or len(self.seen) < self.max_distinct:
                self.seen[text] += 1
        reason = degenerate_reason(caption, **self.thresholds)
        if reason is not None:
            kind = reason_kind(reason)
            self.by_kind[kind] += 1
            kept = self.examples.setdefault(kind, [])
            if len(kept) < self.examples_per_kind:
                kept.append([None if sample is None else str(sample),
                             caption[:80] if isinstance(caption, str) else repr(caption)[:80], reason])
        return reason

    @property
    def degenerate(self) -> int:
        return sum(self.by_kind.values())

    def summary(self) -> dict:
        """JSON-ready: checked, degenerate, by_kind and examples."""
        return {"checked": self.checked, "degenerate": self.degenerate,
                "by_kind": {kind: self.by_kind[kind] for kind in KINDS if self.by_kind[kind]},
                "examples": {kind: list(kept) for kind, kept in self.examples.items()},
                "most_common": [list(item) for item in self.seen.most_common(3)]}

    def most_common(self) -> tuple[str, int] | None:
        """The caption written most often (stripped, lowercased) and its count, or None before any."""
        return self.seen.most_common(1)[0] if self.seen else None

    def merge(self, summary: dict) -> "DegenerateCounter":
        """Add another counter's `summary()` (another rank's) to this one."""
        self.checked += summary["checked"]
        self.by_kind.update(summary["by_kind"])
        for kind, kept in summary["examples"].items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(kept[:max(0, self.examples_per_kind - len(mine))])
        self.seen.update(dict(summary.get("most_common", [])))  # the other rank's top captions only
        return self

    def line(self, what: str = "captions", action: str = "dropped") -> str:
        """One log line: "2 of 100 captions degenerate, dropped (repeated token 1, empty 1); e.g. ...", and the
        most frequent caption where one was written more than once."""
        line = f"0 of {self.checked} {what} degenerate"
        if self.degenerate:
            kinds = ", ".join(f"{kind} {self.by_kind[kind]}" for kind in KINDS if self.by_kind[kind])
            sample, text, reason = next(iter(self.examples.values()))[0]
            where = f"sample {sample!r}" if sample is not None else "one"
            line = (f"{self.degenerate} of {self.checked} {what} degenerate, {action} ({kinds}); "
                    f"e.g. {where}: {text!r} ({reason})")
        top = self.most_common()
        if top is not None and top[1] > 1:
            line += f"; the most frequent caption, {top[0][:60]!r}, {top[1]} times"
        return line
