"""What a stage reads of a manifest's records: text fields holding a string or a list of strings (alt-texts),
checked and deduplicated, and the records a training stage keeps (a readable image, usable texts:
`training_rows`).

A problem is said as common.data.text_problem says it ("field 'x' must be a string or a list of strings, got
123"); a record with one is skipped and counted, or under `strict` stops the run naming the first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import numpy as np

from common.data import BadSampleError, SkipCounter, shown, text_problem


def text_list_problem(record: dict, field: str) -> str | None:
    """Why `field` is neither a string nor a list of strings, or None. Absent, null, blank, [] or a blank item is
    an empty text (web alt-texts often are), not a problem."""
    value = record.get(field)
    if value is None or isinstance(value, str):
        return None
    if not isinstance(value, list):
        return text_problem(value, field, lists=True)
    bad = next((i for i, text in enumerate(value) if not isinstance(text, str)), None)
    return None if bad is None else f"field {field!r}: item {bad} must be a string, got {shown(value[bad])}"


def unique_texts(record: dict, field: str) -> list[str]:
    """The record's unique non-empty texts of `field` in order, stripped; a field of another type is a
    BadSampleError naming the sample."""
    problem = text_list_problem(record, field)
    if problem is not None:
        raise BadSampleError(f"sample {record.get('id')!r}: {problem}")
    value = record.get(field) or []
    texts = [value] if isinstance(value, str) else value
    return list(dict.fromkeys(text.strip() for text in texts if text.strip()))


def usable_rows(records: Sequence[dict], readable: np.ndarray, problem_of: Callable[[dict], str | None],
                strict: bool) -> list[int]:
    """Indices of the records with a readable image and no `problem_of(record)`; the others are counted (their
    unreadable images were counted when embedding), or under `strict` the first is a BadSampleError."""
    kept, skipped = [], SkipCounter()
    for i, record in enumerate(records):
        problem = problem_of(record)
        if problem is None and not readable[i]:
            problem = "unreadable image"
        if problem is None:
            kept.append(i)
        elif strict:
            raise BadSampleError(f"sample {record['id']!r}: {problem}")
        elif problem != "unreadable image":
            skipped.add(str(record["id"]), problem)
    return kept


def training_rows(records: Sequence[dict], readable: np.ndarray, alt_field: str, target_field: str | None,
                  strict: bool) -> list[int]:
    """`usable_rows` of a captioner's training stage: `alt_field` a text or a list of texts (the prompts), and
    the targets there: at least one alt-text when `target_field` is None, else a text in `target_field`."""
    def problem(record: dict) -> str | None:
        problem = text_list_problem(record, alt_field)
        if problem is None and target_field is None and not unique_texts(record, alt_field):
            return f"no alt-text in {alt_field!r}"
        if problem is None and target_field is not None:
            return text_problem(record.get(target_field), target_field)
        return problem

    return usable_rows(records, readable, problem, strict)


def vocabulary_texts(records: Sequence[dict], alt_field: str, target_field: str) -> list[str]:
    """The texts a new decoder's vocabulary is built from: the records' unique alt-texts and their targets (those
    that are strings: stage 1's records need none)."""
    return [text for record in records for text in unique_texts(record, alt_field)] + [
        record[target_field] for record in records if isinstance(record.get(target_field), str)]


def records_digest(records: Sequence[dict], fields: Sequence[str]) -> str:
    """"N records, sha256 <16 hex>" of the records' ids and `fields` in order: what a training step reads of them,
    for a resume's recipe (another row, image or text is another run)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record["id"], *(record.get(field) for field in fields)], default=str).encode())
    return f"{len(records)} records, sha256 {digest.hexdigest()[:16]}"
