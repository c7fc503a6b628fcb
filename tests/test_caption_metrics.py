"""common/caption_metrics.py: the COCO caption toolkit's numbers (pycocoevalcap's COCOEvalCap) on the same
captions, a hand-checked value, the PTB tokenizer really used, and the labelled fallback without Java."""

import shutil

import pytest

from common import caption_metrics as cm

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no `java` on PATH: the PTB tokenizer needs it")

# 4 images, 2-5 references each: case, punctuation, contractions, possessives, brackets, quotes, a line break
REFERENCES = {
    7: ["A dog's toy lies on the grass.", "The dog doesn't play with its toy!", "a DOG, a toy, and grass"],
    11: ["Two people ride bikes down a hill.", "two cyclists (a man and a woman) on a road",
         "People riding bicycles; it's sunny.", "Bikers going down-hill...", "\"Fast\" riders on a slope"],
    23: ["A kitchen with a stove and a sink.", "An empty kitchen; nobody's cooking."],
    42: ["A plate of food: rice, beans & salad.", "Dinner's served on a white plate.",
         "rice and beans\non a plate", "Someone's lunch -- rice and beans."],
}
CANDIDATES = {7: "A dog's toy on the grass.", 11: "Two people riding bikes down a hill!",
              23: "a kitchen with a sink, a stove", 42: "A plate of rice and beans; it's dinner."}


class FakeCoco:
    """What COCOEvalCap reads of a COCO object: getImgIds() and imgToAnns[id] = [{"caption": ...}, ...]."""

    def __init__(self, captions: dict):
        self.imgToAnns = {k: [{"image_id": k, "caption": c} for c in v] for k, v in captions.items()}

    def getImgIds(self):
        return list(self.imgToAnns)


def coco_eval_cap(references: dict, candidates: dict, monkeypatch) -> dict:
    """pycocoevalcap.eval.COCOEvalCap's scores; SPICE stubbed out where its Stanford jars are absent (offline)."""
    import pycocoevalcap.eval as coco_eval

    if cm.spice_missing():
        class NoSpice:  # COCOEvalCap runs every scorer; Spice() would download its jars
            def compute_score(self, gts, res):
                return float("nan"), [float("nan")] * len(gts)

            def method(self):
                return "SPICE"

        monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    evaluator = coco_eval.COCOEvalCap(FakeCoco(references), FakeCoco({k: [c] for k, c in candidates.items()}))
    evaluator.evaluate()
    return evaluator.eval


@needs_java
def test_every_metric_equals_coco_eval_cap(monkeypatch):
    ours = cm.coco_scores(REFERENCES, CANDIDATES, scale=1.0)
    theirs = coco_eval_cap(REFERENCES, CANDIDATES, monkeypatch)
    expected = [m for m in cm.ALL_METRICS if m != "SPICE" or not cm.spice_missing()]
    assert [m for m in ours if m in cm.ALL_METRICS] == expected
    for metric in expected:
        assert ours[metric] == pytest.approx(theirs[cm.COCO_NAMES[metric]], abs=1e-9), metric
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0.5
    assert ours["tokenizer"] == cm.PTB_LABEL and ours["backend"].startswith("pycocoevalcap ")
    assert ("SPICE" in ours.get("omitted", {})) == bool(cm.spice_missing())  # left out, and said so, never a failure
    percent = cm.coco_scores(REFERENCES, CANDIDATES, scale=100.0, metrics=("BLEU-4", "CIDEr"))
    assert (percent["BLEU-4"] == pytest.approx(100 * ours["BLEU-4"])
            and percent["CIDEr"] == pytest.approx(100 * ours["CIDEr"]))


@needs_java
def test_identical_captions_by_hand():
    """Candidate = its image's only reference, no word shared between images: BLEU-n = 1 and ROUGE-L = 1; CIDEr(-D) =
    10 x mean over n = 1..4 of the tf-idf cosine, 1 where the caption has n-grams (PTB: "a dog 's toy" has 4 words,
    "do n't run" 3), so (10 + 7.5) / 2."""
    captions = {1: "A dog's toy.", 2: "Don't run!"}
    scores = cm.coco_scores({k: [c] for k, c in captions.items()}, captions, scale=1.0,
                            metrics=("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-8) and scores["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
    assert scores["ROUGE-L"] == 1.0 and scores["CIDEr"] == pytest.approx(8.75, abs=1e-9)
    assert set(scores) == {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "tokenizer", "backend"}  # only what was asked


@needs_java
def test_the_ptb_tokenizer_is_used():
    """PTB splits clitics ("dog's" -> "dog 's", "don't" -> "do n't"), where stripping punctuation gives "dog s",
    "don t": a candidate written in the stripped form matches the reference under the fallback only."""
    refs, cands = cm.ptb_tokenize({1: ["A dog's toy, isn't it?", "(Please) don't\r\nrun..."]}, {1: "\"Quoted\" text"})
    assert refs == {1: ["a dog 's toy is n't it", "-lrb- please -rrb- do n't run"]} and cands == {1: ["quoted text"]}
    references, candidates = {1: ["the dog's bed"], 2: ["I don't know"]}, {1: "the dog s bed", 2: "i don t know"}
    ptb = cm.coco_scores(references, candidates, scale=1.0, metrics=("BLEU-4", "CIDEr"))
    assert ptb["tokenizer"] == cm.PTB_LABEL and ptb["BLEU-4"] < 0.5
    plain = [" ".join(cm.plain_words(t)) for t in ("the dog's bed", "I don't know")]
    assert plain == ["the dog s bed", "i don t know"]  # the fallback would have scored these as identical


def test_without_java_one_line_and_a_labelled_fallback(monkeypatch, capsys):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    monkeypatch.setattr(cm, "java_missing", lambda: "no `java` on PATH")
    monkeypatch.setattr(cm, "_warned", set())
    scores = cm.coco_scores(REFERENCES, CANDIDATES, scale=100.0)
    again = cm.coco_scores(REFERENCES, CANDIDATES, scale=100.0, metrics=("CIDEr",))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no `java` on PATH" in lines[0] and "apt-get install default-jre-headless" in lines[0]
    assert scores["tokenizer"] == again["tokenizer"] == cm.FALLBACK_LABEL
    assert "not comparable with COCOEvalCap" in cm.FALLBACK_LABEL
    assert set(scores["omitted"]) == {"METEOR", "SPICE"} and "METEOR" not in scores and "SPICE" not in scores
    gts = {k: [" ".join(cm.plain_words(r)) for r in v] for k, v in REFERENCES.items()}
    res = {k: [" ".join(cm.plain_words(c))] for k, c in CANDIDATES.items()}
    assert scores["BLEU-4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-9)
    assert scores["ROUGE-L"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert scores["CIDEr"] == again["CIDEr"] == pytest.approx(100 * Cider().compute_score(gts, res)[0], abs=1e-9)


def test_a_failing_tokenizer_takes_the_labelled_fallback(monkeypatch, capsys):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    monkeypatch.setattr(cm, "java_missing", lambda: None)
    monkeypatch.setattr(cm, "_warned", set())
    monkeypatch.setattr(PTBTokenizer, "tokenize", lambda self, captions: {})  # what a java that exits at once gives
    scores = cm.coco_scores(REFERENCES, CANDIDATES, scale=1.0, metrics=("BLEU-4", "METEOR"))
    assert scores["tokenizer"] == cm.FALLBACK_LABEL and "METEOR" in scores["omitted"] and "BLEU-4" in scores
    assert "PTB tokenizer failed" in capsys.readouterr().err


def test_spice_without_its_jars_is_left_out_and_said_so(monkeypatch):
    monkeypatch.setattr(cm, "spice_missing", lambda: "Stanford CoreNLP jars not in lib")
    monkeypatch.setattr(cm, "_warned", set())
    scores = cm.coco_scores({1: ["a cat"]}, {1: "a cat"}, scale=1.0, metrics=("SPICE", "BLEU-1"))
    assert "SPICE" not in scores and "SPICE" in scores["omitted"] and "BLEU-1" in scores


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown caption metrics"):
        cm.coco_scores({1: ["a"]}, {1: "a"}, scale=1.0, metrics=("BLEU",))
    with pytest.raises(ValueError, match="different ids"):
        cm.coco_scores({1: ["a"]}, {2: "a"}, scale=1.0)
    with pytest.raises(ValueError, match="at least one reference"):
        cm.coco_scores({1: []}, {1: "a"}, scale=1.0)


def test_table_note_names_backend_and_tokenizer():
    rows = [{"CIDEr": 1.0, "tokenizer": cm.PTB_LABEL, "backend": "pycocoevalcap 1.2"}, {"names kept": 1.0}]
    assert cm.table_note(rows) == f"COCO caption metrics by pycocoevalcap 1.2, tokenizer: {cm.PTB_LABEL}"
    assert cm.table_note([{"names kept": 1.0}]) == ""


def test_each_caller_labels_its_results_and_tables(monkeypatch):
    """capsfusion, altogether and dico: the fallback's label reaches the metrics they write and each results table."""
    import altogether
    import capsfusion
    from experiments import capsfusion_miniature
    from experiments import dico_miniature
    from experiments import altogether_miniature

    monkeypatch.setattr(cm, "java_missing", lambda: "no `java` on PATH")
    monkeypatch.setattr(cm, "_warned", set())
    records = [{"alt_text": "VW wheel, Berlin"}, {"alt_text": "Aldora emblem"}]
    metrics = capsfusion_miniature.fusion_quality(["a wheel in berlin.", "an emblem"], records, capsfusion.Args(),
                                                  reference=["A wheel of a VW car in Berlin.", "the emblem"])
    assert metrics["tokenizer"] == cm.FALLBACK_LABEL and {"BLEU-4", "CIDEr", "backend"} <= set(metrics)
    row = {"BLEU-4": 1.0, "CIDEr": 2.0, "tokenizer": cm.FALLBACK_LABEL, "backend": "pycocoevalcap 1.2"}
    fusion = [{"teacher": {"names_kept": 1.0}, "fuser": {"names_kept": 1.0, **row}}]
    scaling = [{"sizes": [8], "curves": {"raw": [dict.fromkeys(capsfusion_miniature.PLOTTED, 1.0)]}}]
    tables = {"capsfusion": capsfusion_miniature.summary_table(fusion, scaling, capsfusion.Args(), 60.0),
              "dico": dico_miniature.markdown_table({"xe/best": [row], "ground truth": [{**row, "CIDEr": 3.0}]}),
              "altogether": altogether_miniature.markdown_table(
                  {name: {**{k: [1.0] for k in altogether_miniature.COLUMNS}, **{k: [v] for k, v in row.items()}}
                   for name in altogether_miniature.ROWS}, altogether.Args(), 60.0, 2)}
    for caller, table in tables.items():
        assert f"tokenizer: {cm.FALLBACK_LABEL}" in table, caller
