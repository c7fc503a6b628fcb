r"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as the COCO caption toolkit computes them.

The toolkit is pycocoevalcap (github.com/salaniz/pycocoevalcap), the Python 3 package of the MS COCO
caption evaluation server's code (Chen et al. 2015, "Microsoft COCO Captions: Data Collection and
Evaluation Server", arXiv:1504.00325). `coco_scores` runs its own pieces in its own order: the Java
Stanford PTB tokenizer (lower-cased, its punctuation tokens dropped) on references and candidates,
then its Bleu, Meteor, Rouge, Cider and Spice scorers, so that each number equals what
`pycocoevalcap.eval.COCOEvalCap` reports on the same captions. Differences in how: references and
candidates go through one tokenizer call (the tokenizer works line by line), and only the metrics
asked for are computed (METEOR and SPICE each start a Java program of their own). One in what: every
line break in a caption becomes a space; COCOEvalCap replaces "\n" only, and a "\r" or "\u2028" there
shifts every later caption onto another's tokens.

SPICE runs only where the Stanford CoreNLP 3.6.0 jars it needs are in pycocoevalcap's spice/lib
folder (pycocoevalcap downloads them on first use; offline they are absent): otherwise it is left
out and the result's "omitted" says why. Without Java, BLEU, ROUGE-L and CIDEr are computed on a
fallback tokenization (lower-case, punctuation removed), METEOR and SPICE are left out, one line on
stderr says what to install, and the result's "tokenizer" label says so: such numbers are not
comparable with COCOEvalCap's.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import string
import sys
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence

ALL_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
COCO_NAMES = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
              "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr", "SPICE": "SPICE"}  # COCOEvalCap.eval's keys
PTB_LABEL = "PTB (pycocoevalcap's Stanford PTBTokenizer, Java), as COCOEvalCap"
FALLBACK_LABEL = "fallback (no Java): lowercase, punctuation stripped; not comparable with COCOEvalCap"
INSTALL_JAVA = "install a Java runtime, e.g. `apt-get install default-jre-headless`"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")  # what Spice() would download

_warned: set[str] = set()  # fallback reasons already printed: one line per process, not one per evaluation


def java_missing() -> str | None:
    """Why Java cannot run here, or None (tests monkeypatch this to take the fallback path)."""
    return None if shutil.which("java") else "no `java` on PATH"


def spice_missing() -> str | None:
    """Why SPICE cannot run here, or None: its Stanford CoreNLP jars absent from pycocoevalcap's spice/lib."""
    import pycocoevalcap.spice.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    absent = [jar for jar in SPICE_JARS if not (lib / jar).exists()]
    return (f"Stanford CoreNLP jars {', '.join(absent)} not in {lib} (pycocoevalcap.spice.get_stanford_models "
            "downloads them)") if absent else None


def plain_words(text: str) -> list[str]:
    """Lower-cased words, punctuation removed: the fallback tokenization (also a plain word count for callers)."""
    return text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation))).split()


def ptb_tokenize(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]) -> tuple[dict, dict]:
    """Both sides through pycocoevalcap's PTBTokenizer in one Java call; RuntimeError if it returns too few lines."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # the tokenizer replaces "\n" only; Java reads "\r", "\u2028", ... as line ends too (see the module docstring)
    one_line = lambda text: " ".join(text.splitlines())  # noqa: E731
    lines = {("ref", k): [{"caption": one_line(r)} for r in refs] for k, refs in references.items()}
    lines.update({("cand", k): [{"caption": one_line(c)}] for k, c in candidates.items()})
    tokens = PTBTokenizer().tokenize(lines)
    if any(len(tokens.get(key, ())) != len(value) for key, value in lines.items()):
        raise RuntimeError("the Java PTB tokenizer returned fewer lines than it was given")
    return {k: tokens[("ref", k)] for k in references}, {k: tokens[("cand", k)] for k in candidates}


def warn_once(reason: str) -> None:
    """One line on stderr per reason and process: what is missing, what is left out, how to install it."""
    if reason not in _warned:
        _warned.add(reason)
        print(f"caption metrics: Java unavailable ({reason}); BLEU/ROUGE-L/CIDEr use a fallback tokenization "
              f"(lowercase, punctuation stripped; not comparable with COCOEvalCap), METEOR and SPICE are left out; "
              f"for the COCO toolkit's PTB tokenizer {INSTALL_JAVA}", file=sys.stderr, flush=True)


def coco_scores(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], *, scale: float,
                metrics: Iterable[str] = ALL_METRICS, per_item: dict | None = None) -> dict:
    """COCO caption metrics of `candidates` ({id: caption}) against `references` ({id: [caption, ...]}).

    scale: what each score is multiplied by. COCOEvalCap reports fractions (scale=1.0: BLEU in [0, 1], CIDEr
    up to 10); the captioning literature prints x 100 (scale=100.0).
    metrics: a subset of ALL_METRICS to compute, e.g. ("BLEU-4", "CIDEr") in a training loop (METEOR and SPICE
    each start a Java program).
    Returns {metric: score, ..., "tokenizer": PTB_LABEL or FALLBACK_LABEL, "backend": "pycocoevalcap <version>"},
    and "omitted": {metric: why} when a metric asked for could not be computed (SPICE without its jars; METEOR
    and SPICE without Java). Captions are scored as given: an empty candidate scores 0, as in COCOEvalCap.
    per_item: when given, receives ROUGE-L's and CIDEr's score of each candidate (times scale, in the order of
    `candidates`), whose means are their corpus scores (CIDEr-D's document frequencies come from the references
    alone); BLEU and METEOR are corpus statistics, not means, and have none.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.spice.spice import Spice

    metrics = tuple(metrics)
    if unknown := set(metrics) - set(ALL_METRICS):
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    if set(references) != set(candidates):
        raise ValueError(f"references and candidates have different ids ({len(set(references) ^ set(candidates))} "
                         "in one only)")
    if not references or not all(references[k] for k in references):
        raise ValueError("every id needs at least one reference caption")
    wanted, ids = [m for m in ALL_METRICS if m in metrics], list(candidates)
    omitted, reason = {}, java_missing()
    if reason is None:
        try:
            gts, res = ptb_tokenize({k: references[k] for k in ids}, candidates)
        except (OSError, RuntimeError) as error:  # a java that does not run, an unwritable temporary file
            reason = f"the PTB tokenizer failed: {error}"
    if reason is not None:
        warn_once(reason)
        gts = {k: [" ".join(plain_words(r)) for r in references[k]] for k in ids}
        res = {k: [" ".join(plain_words(candidates[k]))] for k in ids}
        omitted = {m: f"needs Java ({reason})" for m in ("METEOR", "SPICE") if m in wanted}
    elif "SPICE" in wanted and (why := spice_missing()):
        omitted["SPICE"] = why

    scores = {}
    if any(m.startswith("BLEU") for m in wanted):
        bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
        scores.update({f"BLEU-{n}": bleu[n - 1] for n in range(1, 5)})
    for name, scorer in (("METEOR", Meteor), ("ROUGE-L", Rouge), ("CIDEr", Cider), ("SPICE", Spice)):
        if name in wanted and name not in omitted:  # Meteor() and Spice() start Java only when constructed
            scores[name], each = scorer().compute_score(gts, res)
            if per_item is not None and name in ("ROUGE-L", "CIDEr"):  # each: in the order of gts' keys
                position = {key: i for i, key in enumerate(gts)}
                per_item[name] = [scale * float(each[position[key]]) for key in ids]
    result = {m: scale * float(scores[m]) for m in wanted if m in scores}
    result["tokenizer"] = PTB_LABEL if reason is None else FALLBACK_LABEL
    result["backend"] = f"pycocoevalcap {importlib.metadata.version('pycocoevalcap')}"
    if omitted:
        result["omitted"] = omitted
    return result


def table_note(rows: Iterable[Mapping]) -> str:
    """One line for a results table: the backend and tokenizer(s) its rows' COCO metrics came from ('' if none)."""
    labels = sorted({(row["backend"], row["tokenizer"]) for row in rows if "tokenizer" in row})
    return "; ".join(f"COCO caption metrics by {backend}, tokenizer: {tokenizer}" for backend, tokenizer in labels)
