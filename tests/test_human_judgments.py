"""common/human_judgments.py and common/judgment_readers.py (`python -m common.clip_score correlate`): the five
benchmarks read from fixtures in their distributed layouts, the rank statistics against scipy, pairwise accuracies by
hand, and the count of captions cut at the context."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.io
import scipy.stats
import torch
from PIL import Image

import common.clip_score as cs
import common.human_judgments as hj
from common.clip_score import count_truncated, load_clip, main
from common.data import write_manifest
from common.human_judgments import (CorrelateArgs, kendall_tau, pairwise_accuracy, read_composite, read_flickr8k_cf,
                                    read_flickr8k_expert, read_foil, read_pascal50s)
from common.judgment_readers import _words
from tests.realarch import serve_open_clip_tag

MICRO = "micro-ViT-16"  # random weights, context 48
LONG = "a dog " + "and a very long story about it " * 9 + "at the end"  # over 48 tokens, under 77


def picture(path, seed: int) -> None:
    """A small distinct JPEG: what a benchmark image is to the reader (a file the scorer opens)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The random micro CLIP and its weights as a file, the --pretrained the commands are given. Seed 4: the fixtures'
    image-caption cosines are all above 0 (measured), so the clamp hides nothing and no ranking is constant."""
    torch.manual_seed(4)
    bundle = load_clip(MICRO, device="cpu")
    path = tmp_path_factory.mktemp("micro") / "micro.pt"
    torch.save(bundle.model.state_dict(), path)
    return bundle, str(path)


def run(benchmark: str, data, micro, tmp_path, *extra) -> dict:
    report = main(["correlate", "--benchmark", benchmark, "--data", str(data), "--model", MICRO, "--pretrained",
                   micro[1], "--device", "cpu", "--out", str(tmp_path / f"{benchmark}.json"), *extra])
    assert all(np.isfinite(v) for stats in report["results"].values() for v in stats.values()), report["results"]
    return report


def direct(bundle, images, candidates, refs) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-S and RefCLIP-S by the module's plain functions, one call, no cache: the independent computation."""
    ref = cs.ref_clip_s(bundle, [str(i) for i in images], candidates, refs, progress=False)
    return np.array(ref["score"]["per_sample"]), np.array(ref["per_sample"])


# ---------------------------------------------------------------------------------------------
# Rank statistics and pairwise accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 17, 400, 5000])
def test_kendall_tau_b_and_c_match_scipy_on_data_with_ties(n):
    rng = np.random.default_rng(n)
    pairs = [(rng.integers(0, 4, n), rng.integers(1, 6, n)),  # Likert against Likert: ties on both sides
             (np.round(rng.normal(size=n), 1), rng.integers(1, 5, n)),  # scores with some ties against ratings
             (rng.normal(size=n), rng.normal(size=n))]  # no ties
    for x, y in pairs:
        for variant in "bc":
            expected = scipy.stats.kendalltau(x, y, variant=variant).statistic
            assert kendall_tau(x, y, variant) == pytest.approx(expected, rel=1e-12, abs=1e-15, nan_ok=True), variant


def test_kendall_tau_constant_and_bad_input():
    for variant in "bc":
        assert np.isnan(kendall_tau([2, 2, 2], [1, 2, 3], variant))
        assert np.isnan(scipy.stats.kendalltau([2, 2, 2], [1, 2, 3], variant=variant).statistic)
    with pytest.raises(ValueError, match="variant"):
        kendall_tau([1, 2], [1, 2], "a")
    with pytest.raises(ValueError, match="one length"):
        kendall_tau([1, 2], [1, 2, 3], "b")


def test_pairwise_accuracy_counts_a_tie_as_one_half():
    assert pairwise_accuracy([0.9, 0.2, 0.5, 0.7], [0.1, 0.8, 0.5, 0.6]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


# ---------------------------------------------------------------------------------------------
# Flickr8k: ExpertAnnotations.txt, CrowdFlowerAnnotations.txt, Flickr8k.token.txt, Flicker8k_Dataset/
# ---------------------------------------------------------------------------------------------

F8K = ["1056338697_4f7d7ce270.jpg", "106490881_5a2dd9b7bd.jpg", "1082379191_ec1e53f996.jpg"]
F8K_CAPTIONS = {F8K[0]: ["A man rides a red bike down the road .", "A cyclist on a street .", "a man on a bicycle",
                         "Someone cycling past houses .", "A person riding a bike ."],
                F8K[1]: ["Two dogs play in the snow .", "Dogs running in snow .", "two brown dogs outside",
                         "A pair of dogs in winter .", "The dogs chase each other ."],
                F8K[2]: ["A child kicks a ball .", "A boy playing football .", "kid with a soccer ball",
                         "A young boy on a field .", LONG]}
# image, caption id, the three experts (the caption id of an own reference is dropped)
EXPERT = [(F8K[0], f"{F8K[1]}#0", (1, 1, 2)), (F8K[0], f"{F8K[0]}#1", (4, 4, 4)), (F8K[0], f"{F8K[2]}#2", (2, 3, 2)),
          (F8K[1], f"{F8K[0]}#0", (1, 2, 1)), (F8K[1], f"{F8K[2]}#4", (3, 3, 4)), (F8K[2], f"{F8K[0]}#3", (2, 2, 2)),
          (F8K[2], f"{F8K[1]}#1", (4, 3, 4))]
# image, caption id, fraction yes, yes, no
CROWDFLOWER = [(F8K[0], f"{F8K[0]}#0", 1.0, 3, 0), (F8K[0], f"{F8K[1]}#2", 1 / 3, 1, 2),
               (F8K[1], f"{F8K[0]}#4", 0.0, 0, 3), (F8K[1], f"{F8K[1]}#3", 2 / 3, 2, 1),
               (F8K[2], f"{F8K[2]}#1", 1.0, 4, 0), (F8K[2], f"{F8K[0]}#2", 0.25, 1, 3)]


def caption_of(caption_id: str) -> str:
    image, k = caption_id.split("#")
    return F8K_CAPTIONS[image][int(k)]


def write_flickr8k_token(path) -> None:
    path.write_text("".join(f"{image}#{k}\t{caption}\n" for image, captions in F8K_CAPTIONS.items()
                            for k, caption in enumerate(captions)))


def write_flickr8k(root, images: str = "Flicker8k_Dataset"):
    """Flickr8k_Dataset.zip and Flickr8k_text.zip unpacked side by side, as clipscore's download.py leaves them."""
    for seed, image in enumerate(F8K):
        picture(root / images / image, seed)
    write_flickr8k_token(root / "Flickr8k.token.txt")
    (root / "ExpertAnnotations.txt").write_text(
        "".join(f"{image}\t{cid}\t{e[0]}\t{e[1]}\t{e[2]}\n" for image, cid, e in EXPERT))
    (root / "CrowdFlowerAnnotations.txt").write_text(
        "".join(f"{image}\t{cid}\t{p:.6f}\t{yes}\t{no}\n" for image, cid, p, yes, no in CROWDFLOWER))
    return root


def expert_rows(root):
    """The SPICE convention by hand: drop a candidate that is one of its image's references; a row per expert."""
    rows = [(root / "Flicker8k_Dataset" / image, caption_of(cid), F8K_CAPTIONS[image], rating)
            for image, cid, experts in EXPERT if caption_of(cid) not in F8K_CAPTIONS[image] for rating in experts]
    return [list(column) for column in zip(*rows)]


def test_flickr8k_expert_from_the_distributed_files(micro, tmp_path, capsys):
    root = write_flickr8k(tmp_path / "flickr8k")
    items = read_flickr8k_expert(root)
    assert len(items.ratings) == 18 and items.notes["candidates_in_own_references_dropped"] == 1
    report = run("flickr8k-expert", root, micro, tmp_path)
    images, candidates, refs, ratings = expert_rows(root)
    score, ref = direct(micro[0], images, candidates, refs)
    assert report["n"] == 18 and report["metrics"] == ["CLIP-S", "RefCLIP-S"]
    for name, values in (("CLIP-S", score), ("RefCLIP-S", ref)):
        for variant in "bc":
            expected = 100 * scipy.stats.kendalltau(values, ratings, variant=variant).statistic
            assert report["results"][name][f"tau_{variant}"] == pytest.approx(expected, abs=1e-9), (name, variant)
    assert report["published"]["CLIP-S"]["tau_c"] == {"value": 51.2, "confirmed": True,
                                                      "source": "CLIPScore, Hessel et al. 2021 (arXiv 2104.08718v3), "
                                                                "Table 1"}
    assert report["published"]["RefCLIP-S"]["tau_c"]["value"] == 53.0
    # the long caption is a candidate (of image 1) and a reference (of image 2): each distinct text counted once
    assert report["truncated"] == {"context_length": 48, "candidates": 1, "of_candidates": 6, "references": 1,
                                   "of_references": 15}
    assert json.loads((tmp_path / "flickr8k-expert.json").read_text())["results"] == report["results"]
    out, err = capsys.readouterr()
    assert re.search(r"CLIP-S\s+tau_c\s+-?\d+\.\d\d\s+51\.2\s+CLIPScore", out)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 of 6 candidates and 1 of 15 references exceed the model's 48-token context and "
                        "were truncated: the text past the cut is ignored in their scores (docs/clip_score.md)"]


def clipscore_json(which: str) -> dict:
    """clipscore's flickr8k.json / crowdflower_flickr8k.json for the same judgments, written as its download.py
    writes them (image_path under Flicker8k_Dataset/, ground_truth, one human_judgement per rating)."""
    out = {}
    for image, cid, *rest in (EXPERT if which == "expert" else CROWDFLOWER):
        caption, stem = caption_of(cid), image.split(".")[0]
        if which == "expert" and caption in F8K_CAPTIONS[image]:
            continue
        refs = F8K_CAPTIONS[image]
        if which == "cf":
            rated = {caption_of(c) for i, c, *_ in CROWDFLOWER if i == image}
            refs = [ref for ref in refs if ref not in rated]
        entry = out.setdefault(stem, {"human_judgement": [], "image_id": stem, "ground_truth": refs,
                                      "image_path": f"Flicker8k_Dataset/{image}"})
        ratings = rest[0] if which == "expert" else [rest[0]]
        entry["human_judgement"] += [{"image_id": stem, "image_path": entry["image_path"], "caption": caption,
                                      "rating": float(r)} for r in ratings]
    return out


def test_flickr8k_cf_and_the_clipscore_json_alternative(micro, tmp_path):
    root = write_flickr8k(tmp_path / "flickr8k")
    items = read_flickr8k_cf(root)
    assert len(items.ratings) == 6 and items.notes["references_removed"] == 3
    assert items.refs[0] == F8K_CAPTIONS[F8K[0]][1:]  # its own caption #0 was rated: not a reference any more
    report = run("flickr8k-cf", root, micro, tmp_path)
    score, ref = direct(micro[0], items.images, items.candidates, items.refs)
    expected = 100 * scipy.stats.kendalltau(ref, [r[2] for r in CROWDFLOWER], variant="b").statistic
    assert report["results"]["RefCLIP-S"]["tau_b"] == pytest.approx(expected, abs=1e-9)
    assert report["published"]["CLIP-S"]["tau_b"]["value"] == 34.4
    # the same judgments as clipscore's JSON files (pacscore's Flickr8k folder), without the annotation files
    for which, benchmark in (("expert", "flickr8k-expert"), ("cf", "flickr8k-cf")):
        alt = tmp_path / f"json-{which}"
        for seed, image in enumerate(F8K):
            picture(alt / "Flicker8k_Dataset" / image, seed)
        name = "flickr8k.json" if which == "expert" else "crowdflower_flickr8k.json"
        (alt / name).write_text(json.dumps(clipscore_json(which)))
        from_json = run(benchmark, alt, micro, tmp_path)
        from_text = report if which == "cf" else run(benchmark, root, micro, tmp_path)
        assert from_json["notes"]["source"] == name and from_json["n"] == from_text["n"]
        for metric, values in from_text["results"].items():
            assert from_json["results"][metric] == pytest.approx(values, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Composite: AMT_eval/{8k,30k,coco}_correctness.csv and the source data sets' captions
# ---------------------------------------------------------------------------------------------

F30K = {"1007129816.jpg": ["A man in an orange hat .", "A man wears a hat .", "Man with a beanie .",
                           "A bearded man outdoors .", "Someone in orange headwear ."],
        "1009434119.jpg": ["A dog runs across the grass .", "A black and white dog running .", "Dog on a lawn .",
                           "A dog in a park .", "The dog plays outside ."]}
COCO = {42: ["A plate of food on a table.", "Some food sits on a plate.", "A dinner plate with vegetables.",
             "Food served on a white plate.", "A meal on a table."],
        74: ["A picture of a dog laying on the ground.", "Dog snoozing by a bike on the edge of a cobblestone street",
             "The white dog lays next to the bicycle on the sidewalk.",
             "a white dog is sleeping on a street and a bicycle", "A puppy rests on the street next to a bicycle."]}
# subset: [(image URL, captions, ratings, index of the rated reference)]; the first caption is a reference in AMT's
# copy (other case and punctuation; COCO image 74's in other words: found by similarity)
COMPOSITE = {
    "8k": [(f"http://farm4.staticflickr.com/3217/{F8K[0]}", ["a man rides a red bike down the road", "a dog",
                                                              "a man on a street"], [5, 1, 3], 0),
           (f"http://farm1.staticflickr.com/45/{F8K[2].split('.')[0]}.jpg",
            ["a young boy on a field", "a boy kicks", "children"], [4, 2, 1], 3)],
    "30k": [("http://farm8.staticflickr.com/1007129816.jpg", ["A man in an orange hat", "a hat", "an orange", "extra"],
             [5, 3, 2, 4], 0),
            ("http://farm9.staticflickr.com/1009434119.jpg", ["dog on a lawn", "a cat", "grass", "extra"],
             [4, 1, 2, 5], 2)],
    "coco": [("http://mscoco.org/images/COCO_val2014_000000000042.jpg", ["some food sits on a plate", "a car", "food",
                                                                          "extra"], [5, 1, 4, 2], 1),
             ("http://mscoco.org/images/COCO_val2014_000000000074.jpg", ["a puppy resting on a street by a bike",
                                                                          "a cat", "a dog outside", "extra"],
              [5, 1, 3, 3], 4)],
}
COMPOSITE_IMAGES = {"8k": ("flickr8k_images", lambda url: url.split("/")[-1]),
                    "30k": ("flickr30k_images", lambda url: url.split("/")[-1]),
                    "coco": ("mscoco_images", lambda url: url.split("/")[-1])}


def amt_csv(path, rows) -> None:
    """An AMT results file: ';'-separated, a header, 27 HIT fields, the image URL, the captions, their ratings; the
    files end with rows that are not judgments."""
    n = len(rows[0][1])
    header = [f"HIT.field{i}" for i in range(27)] + ["Input.image_url"] + [f"Input.cap{i}" for i in range(n)] + [
        f"Answer.rating{i}" for i in range(n)]
    lines = [";".join(header)]
    for i, (url, captions, ratings, _) in enumerate(rows):
        lines.append(";".join([f"3HIT{i}", "3TYPE", "Rate the captions", *[f"f{j}" for j in range(24)], url, *captions,
                               *map(str, ratings)]))
    lines += [";" * (27 + 2 * n), "Total;" + ";" * 10]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_composite(root):
    for subset, rows in COMPOSITE.items():
        amt_csv(root / "AMT_eval" / f"{subset}_correctness.csv", rows)
        folder, name = COMPOSITE_IMAGES[subset]
        for seed, (url, *_) in enumerate(rows):
            picture(root / folder / name(url), 10 + seed + 5 * len(subset))
    write_flickr8k_token(root / "Flickr8k.token.txt")
    (root / "results_20130124.token").write_text(
        "".join(f"{image}#{k}\t{c}\n" for image, captions in F30K.items() for k, c in enumerate(captions)))
    (root / "captions_val2014.json").write_text(json.dumps({"annotations": [
        {"image_id": image_id, "id": 1000 * image_id + k, "caption": c}
        for image_id, captions in COCO.items() for k, c in enumerate(captions)]}))
    return root


def composite_rows(root):
    """The CLIPScore protocol by hand: the first three rated captions, the rated reference removed."""
    sources = {"8k": lambda url: F8K_CAPTIONS[url.split("/")[-1]], "30k": lambda url: F30K[url.split("/")[-1]],
               "coco": lambda url: COCO[int(url.split("_")[-1].split(".")[0])]}
    rows = []
    for subset, entries in COMPOSITE.items():
        folder, name = COMPOSITE_IMAGES[subset]
        for url, captions, ratings, rated in entries:
            refs = [r for k, r in enumerate(sources[subset](url)) if k != rated]
            rows += [(root / folder / name(url), c, refs, r) for c, r in zip(captions[:3], ratings[:3])]
    return [list(column) for column in zip(*rows)]


def test_composite_from_the_amt_files(micro, tmp_path):
    root = write_composite(tmp_path / "composite")
    # the files' layout as third-party readers index it: URL in column 27, then the captions, then the ratings
    with open(root / "AMT_eval" / "30k_correctness.csv") as handle:
        second = handle.read().splitlines()[1].split(";")
    assert second[27].endswith("1007129816.jpg") and second[28:32] == COMPOSITE["30k"][0][1] and second[35] == "4"
    items = read_composite(root)
    images, candidates, refs, ratings = composite_rows(root)
    assert [str(i) for i in items.images] == [str(i) for i in images] and items.candidates == candidates
    assert items.refs == refs and items.ratings == ratings
    assert {k: v["rows_skipped"] for k, v in items.notes.items()} == {"flickr8k": 2, "flickr30k": 2, "coco": 2}
    assert items.notes["coco"]["rated_reference_removed_by_similarity"] == 1  # image 74: other words
    assert sum(v["rated_reference_removed_by_similarity"] for v in items.notes.values()) == 1
    report = run("composite", root, micro, tmp_path)
    score, ref = direct(micro[0], images, candidates, refs)
    assert report["n"] == 18
    for name, values in (("CLIP-S", score), ("RefCLIP-S", ref)):
        expected = 100 * scipy.stats.kendalltau(values, ratings, variant="c").statistic
        assert report["results"][name]["tau_c"] == pytest.approx(expected, abs=1e-9)
    assert report["published"]["RefCLIP-S"]["tau_c"]["value"] == 55.4


# ---------------------------------------------------------------------------------------------
# Pascal-50S: pyCIDErConsensus/{pair,consensus}_pascal.mat and VOC2010 images
# ---------------------------------------------------------------------------------------------

# image, candidate a, candidate b, category (1 HC, 2 HI, 3 HM, 4 MM), votes for a out of 48
PASCAL = [("2008_000032.jpg", "hc one a", "hc one b", 1, 30), ("2008_000043.jpg", "hc two a", "hc two b", 1, 10),
          ("2008_000053.jpg", "hi one a", "hi one b", 2, 48), ("2008_000064.jpg", "hi two a", "hi two b", 2, 0),
          ("2008_000075.jpg", "hm one a", "hm one b", 3, 25), ("2008_000080.jpg", "hm two a", "hm two b", 3, 24),
          ("2008_000089.jpg", "mm one a", "mm one b", 4, 40), ("2008_000095.jpg", "mm two a", "mm two b", 4, 20)]
JUDGMENTS = 48


def cell(text: str) -> np.ndarray:
    """A 1x1 MATLAB cell holding a string, as consensus_pascal.mat's triplets hold their captions."""
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = text
    return out


def write_pascal(root):
    """pair_pascal.mat (new_input: struct array of image, caption a, caption b; category; new_data: the 11 original
    judgments) and consensus_pascal.mat (triplets: reference, caption B, caption C, winner 1 = B; 48 per pair)."""
    new_input = np.zeros((1, len(PASCAL)), dtype=[("image", object), ("A", object), ("B", object)])
    for i, (image, a, b, _, _) in enumerate(PASCAL):
        new_input[0, i] = (image, a, b)
        picture(root / "images" / image, 40 + i)
    triplets = np.zeros((1, JUDGMENTS * len(PASCAL)), dtype=[("ref", object), ("B", object), ("C", object),
                                                             ("winner", object)])
    for i, (_, a, b, _, votes_a) in enumerate(PASCAL):
        for j in range(JUDGMENTS):
            first, second = (a, b) if j % 2 else (b, a)  # the two captions in both orders
            winner = a if j < votes_a else b
            triplets[0, i * JUDGMENTS + j] = (cell(f"reference {j} of pair {i}"), cell(first), cell(second),
                                              np.array([[1 if winner == first else 2]], dtype=np.uint8))
    folder = root / "pyCIDErConsensus"
    folder.mkdir(parents=True)
    scipy.io.savemat(folder / "pair_pascal.mat", {"new_input": new_input,
                                                   "category": np.array([[p[3] for p in PASCAL]]),
                                                   "new_data": np.ones((len(PASCAL), 11))})
    scipy.io.savemat(folder / "consensus_pascal.mat", {"triplets": triplets})
    return root


def test_pascal50s_fixture_reads_as_the_reference_code_indexes_it(tmp_path):
    root = write_pascal(tmp_path / "pascal")
    pairs = scipy.io.loadmat(root / "pyCIDErConsensus" / "pair_pascal.mat")
    image, a, b = [x[0] for x in pairs["new_input"][0][1]]  # clipscore issue 4's indexing
    assert (image, a, b) == PASCAL[1][:3] and pairs["category"][0][1] == 1
    ref, first, second, winner = [x[0][0] for x in scipy.io.loadmat(
        root / "pyCIDErConsensus" / "consensus_pascal.mat")["triplets"][0][JUDGMENTS + 1]]
    assert ref[0] == "reference 1 of pair 1" and first[0] == "hc two a" and winner == 1  # 1 of its 10 votes for a
    items = read_pascal50s(root, seed=0)
    assert items.categories == ["HC", "HC", "HI", "HI", "HM", "HM", "MM", "MM"]
    assert items.preferred[:5] == ["hc one a", "hc two b", "hi one a", "hi two b", "hm one a"]
    assert len(items.refs[3]) == JUDGMENTS and items.refs[3][7] == "reference 7 of pair 3"
    assert items.notes == {"judgments_per_pair": 48, "vote_ties_broken_at_random": 1,
                           "pairs_with_votes_for_other_captions": 0}
    tie = {read_pascal50s(root, seed=seed).preferred[5] for seed in range(12)}
    assert tie == {"hm two a", "hm two b"}  # 24 to 24: broken at random, by the seed
    assert read_pascal50s(root, seed=3).preferred == read_pascal50s(root, seed=3).preferred


# stub scores, candidate -> CLIP-S and -> RefCLIP-S, chosen so that the accuracies are known by hand
PASCAL_SCORE = {"hc one a": .9, "hc one b": .1, "hc two a": .5, "hc two b": .5,  # HC: right, tie: 75
                "hi one a": .2, "hi one b": .8, "hi two a": .3, "hi two b": .7,  # HI: wrong, right: 50
                "hm one a": .6, "hm one b": .4, "hm two a": .5, "hm two b": .5,  # HM: right, tie (votes tied too): 75
                "mm one a": .8, "mm one b": .2, "mm two a": .1, "mm two b": .9}  # MM: right, right: 100
PASCAL_REF = {"hc one a": .9, "hc one b": .1, "hc two a": .2, "hc two b": .8,  # 100
              "hi one a": .9, "hi one b": .1, "hi two a": .1, "hi two b": .9,  # 100
              "hm one a": .4, "hm one b": .6, "hm two a": .5, "hm two b": .5,  # wrong, tie: 25
              "mm one a": .6, "mm one b": .4, "mm two a": .7, "mm two b": .3}  # right, wrong: 50


def stub_scores(score: dict, ref, calls: list):
    """A score_triples with known numbers: candidate -> score, (candidate, references) -> Ref- score."""

    def fake(scorer, images, candidates, refs=None):
        calls.append(refs)
        out = {"score": np.array([score[c] for c in candidates])}
        if refs is not None:
            out["ref"] = np.array([ref(c, group) for c, group in zip(candidates, refs)])
        return out

    return fake


def test_pascal50s_accuracies_by_hand(micro, tmp_path, monkeypatch):
    root = write_pascal(tmp_path / "pascal")

    def ref(candidate, group):
        pair = next(i for i, p in enumerate(PASCAL) if candidate in p[1:3])
        assert len(group) == 5 and len(set(group)) == 5 and all(g.endswith(f"of pair {pair}") for g in group)
        return PASCAL_REF[candidate]

    calls = []
    monkeypatch.setattr(hj, "score_triples", stub_scores(PASCAL_SCORE, ref, calls))
    report = run("pascal50s", root, micro, tmp_path, "--pascal-draws", "3")
    assert report["results"]["CLIP-S"] == {"HC": 75.0, "HI": 50.0, "HM": 75.0, "MM": 100.0, "mean": 75.0}
    assert report["results"]["RefCLIP-S"] == {"HC": 100.0, "HI": 100.0, "HM": 25.0, "MM": 50.0, "mean": 68.75}
    assert sum(refs is not None for refs in calls) == 2 * 3  # both captions of every pair, once per draw
    draws = [tuple(map(tuple, refs)) for refs in calls if refs is not None]
    assert draws[0] == draws[1] and draws[0] != draws[2]  # one draw for both captions; each draw its own
    assert report["settings"] == {"seed": 0, "precision": "fp32", "pascal_draws": 3, "pascal_refs": 5}
    assert report["published"]["CLIP-S"]["HC"]["value"] == 56.5
    assert report["published"]["RefCLIP-S"]["mean"]["value"] == 83.1


def test_pascal50s_end_to_end(micro, tmp_path):
    report = run("pascal50s", write_pascal(tmp_path / "pascal"), micro, tmp_path)
    items = read_pascal50s(tmp_path / "pascal", seed=0)
    score = [direct(micro[0], items.images, texts, [["x"]] * 8)[0] for texts in (items.preferred, items.other)]
    for category in ("HC", "HI", "HM", "MM"):
        picked = [k for k, c in enumerate(items.categories) if c == category]
        expected = 100 * pairwise_accuracy(score[0][picked], score[1][picked])
        assert report["results"]["CLIP-S"][category] == pytest.approx(expected)
    assert report["n"] == 8 and set(report["results"]["RefCLIP-S"]) == {"HC", "HI", "HM", "MM", "mean"}


# ---------------------------------------------------------------------------------------------
# FOIL: foilv1.0_test_2017.json, COCO's captions_val2014.json and val2014/
# ---------------------------------------------------------------------------------------------

FOIL_COCO = {42: ["A plate of food on a table.", "A bowl of soup next to bread.", "Food served on a white plate.",
                  "A meal with a fork and knife.", "Dinner on a wooden table."],
             74: ["A dog laying on the ground.", "A white dog next to a bicycle.", "A dog sleeping on a street.",
                  "A puppy rests on the sidewalk.", "A dog and a bike outside."],
             133: ["A bed in a small room.", "A neatly made bed.", "A bedroom with a lamp.", "A room with white walls.",
                   "A bed next to a window.", "A quiet hotel room."],
             164: ["A kitchen with a stove.", "An empty kitchen.", "A stove and a sink.", "Cabinets in a kitchen.",
                   "A small kitchen."]}
# annotation id (shared by a true caption and its foils), image, true caption (AMT-style copy), foils
FOIL_GROUPS = [(9001, 42, "a bowl of soup next to bread", ["a bowl of soup next to a cat",
                                                           "a bowl of soup next to a car"]),
               (9002, 42, "A meal with a fork and knife .", ["a meal with a fork and dog"]),
               (9101, 74, "A white dog next to a bicycle.", ["A white dog next to a motorcycle."]),
               (9201, 133, "A bedroom with a lamp.", ["A bedroom with a horse."]),
               (9301, 164, "A small kitchen.", [])]  # a true caption without a foil: no pair


def write_foil(root):
    for seed, image_id in enumerate(FOIL_COCO):
        picture(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", 60 + seed)
    annotations = [{"id": gid, "image_id": image_id, "caption": caption, "foil": foil, "target_word": "x",
                    "foil_word": "ORIG" if not foil else "y"}
                   for gid, image_id, true, foils in FOIL_GROUPS
                   for caption, foil in [(true, False)] + [(f, True) for f in foils]]
    (root / "foilv1.0_test_2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in FOIL_COCO],
        "annotations": annotations}))
    (root / "captions_val2014.json").write_text(json.dumps({"annotations": [
        {"image_id": image_id, "id": 10 * image_id + k, "caption": c}
        for image_id, captions in FOIL_COCO.items() for k, c in enumerate(captions)]}))
    return root


def test_foil_pairs_and_references(tmp_path):
    items = read_foil(write_foil(tmp_path / "foil"), seed=0)
    assert len(items.preferred) == 3 and items.notes["images_without_a_pair"] == 1
    for true, refs, image in zip(items.preferred, items.refs, items.images):
        image_id = int(str(image).split("_")[-1].split(".")[0])
        assert len(refs) == 4 and all(_words(r) != _words(true) for r in refs)
        assert refs == [r for r in FOIL_COCO[image_id] if _words(r) != _words(true)][:4]  # 133 has 6: 4 kept
    picked = {read_foil(tmp_path / "foil", seed=seed).other[0] for seed in range(20)}
    assert picked == {f for _, image_id, _, foils in FOIL_GROUPS if image_id == 42 for f in foils}  # one pair drawn


def test_foil_accuracies_by_hand(micro, tmp_path, monkeypatch):
    root = write_foil(tmp_path / "foil")
    trues = {" ".join(t.split()) for _, _, t, _ in FOIL_GROUPS}
    image_of = {" ".join(c.split()): image_id for _, image_id, t, foils in FOIL_GROUPS for c in [t] + foils}
    score = {c: {42: .7, 74: .4, 133: .5}.get(image_of[c], 0) if c in trues else {42: .3, 74: .6, 133: .5}.get(
        image_of[c], 0) for c in image_of}  # right, wrong, tie: 50

    def ref(candidate, group):
        assert len(group) in (1, 4) and all(_words(g) != _words(candidate) for g in group if candidate in trues)
        if len(group) == 1:  # all right: 100
            return .9 if candidate in trues else .1
        true, foil = {42: (.7, .3), 74: (.4, .6), 133: (.8, .2)}[image_of[candidate]]  # right, wrong, right: 66.7
        return true if candidate in trues else foil

    monkeypatch.setattr(hj, "score_triples", stub_scores(score, ref, []))
    report = run("foil", root, micro, tmp_path)
    assert report["results"]["CLIP-S"] == {"1-ref": 50.0, "4-ref": 50.0}
    assert report["results"]["RefCLIP-S"] == pytest.approx({"1-ref": 100.0, "4-ref": 200 / 3})
    assert report["published"]["RefCLIP-S"]["4-ref"]["value"] == 92.6
    assert report["published"]["RefCLIP-S"]["1-ref"]["value"] == 91.0


def test_foil_end_to_end_and_pac_s_through_the_checkpoint(tmp_path, monkeypatch, capsys):
    """--model ViT-B-32 --pacs-checkpoint: PAC-S and RefPAC-S, the checkpoint's weights, the unconfirmed numbers
    marked; ViT-B-32 at tiny width (its config, offline)."""
    root = write_foil(tmp_path / "foil")
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai", seed=2)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "clip_ViT-B-32.pth")
    report = main(["correlate", "--benchmark", "foil", "--data", str(root), "--model", "ViT-B-32", "--pacs-checkpoint",
                   str(tmp_path / "clip_ViT-B-32.pth"), "--device", "cpu", "--out", str(tmp_path / "foil.json")])
    assert report["metrics"] == ["PAC-S", "RefPAC-S"] and report["pretrained"] is None
    bundle = load_clip("ViT-B-32", None, "cpu", pacs_checkpoint=str(tmp_path / "clip_ViT-B-32.pth"))
    items = read_foil(root, seed=0)
    true, foil = (cs.pac_s(bundle, [str(i) for i in items.images], texts, progress=False)["per_sample"]
                  for texts in (items.preferred, items.other))
    assert report["results"]["PAC-S"]["4-ref"] == pytest.approx(100 * pairwise_accuracy(true, foil))
    published = report["published"]["RefPAC-S"]["4-ref"]
    assert published["value"] == 94.9 and not published["confirmed"] and "8K-image subset" in published["source"]
    out = capsys.readouterr().out
    assert re.search(r"RefPAC-S\s+4-ref\s+-?\d+\.\d\d\s+94\.9\*", out) and "* not confirmed" in out


# ---------------------------------------------------------------------------------------------
# The command line, errors, truncation
# ---------------------------------------------------------------------------------------------


def test_correlate_help_explains_every_flag_and_the_manifest_help_names_correlate(capsys):
    import ast
    import dataclasses
    import inspect

    with pytest.raises(SystemExit) as exit_:
        main(["correlate", "--help"])
    assert exit_.value.code == 0
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    body = ast.parse(inspect.getsource(CorrelateArgs)).body[0].body
    docs = {field.target.id: after.value.value for field, after in zip(body, body[1:])  # a field, then its docstring
            if isinstance(field, ast.AnnAssign) and isinstance(after, ast.Expr)}
    for f in dataclasses.fields(CorrelateArgs):
        doc = docs[f.name]
        assert f"--{f.name.replace('_', '-')}" in shown and " ".join(doc.split()[:6]) in shown, f.name
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "common.clip_score correlate --help" in " ".join(capsys.readouterr().out.split())


def test_python_m_common_human_judgments_is_the_same_command_and_clip_score_imports_it_only_for_correlate(
        micro, tmp_path, capsys):
    root = write_flickr8k(tmp_path / "flickr8k")
    via_clip_score = run("flickr8k-expert", root, micro, tmp_path)
    table = capsys.readouterr().out
    direct_ = hj.main(["--benchmark", "flickr8k-expert", "--data", str(root), "--model", MICRO, "--pretrained",
                       micro[1], "--device", "cpu", "--out", str(tmp_path / "direct.json")])
    assert direct_["results"] == via_clip_score["results"] and capsys.readouterr().out == table
    for argv, prog in ((["correlate", "--help"], "python -m common.clip_score correlate"),
                       (["--help"], "python -m common.human_judgments")):
        with pytest.raises(SystemExit) as exit_:
            (main if argv[0] == "correlate" else hj.main)(argv)
        assert exit_.value.code == 0 and f"usage: {prog} " in capsys.readouterr().out
    # the dependency runs one way: clip_score's module level imports neither human_judgments nor its readers
    tree = ast.parse(Path(cs.__file__).read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try))]
    assert not any(word in ast.unparse(node) for node in top for word in ("human_judgments", "judgment_readers"))


def test_correlate_expected_errors_are_one_line(tmp_path, micro):
    (tmp_path / "empty").mkdir()
    bad = write_flickr8k(tmp_path / "bad")
    with open(bad / "ExpertAnnotations.txt", "a") as handle:
        handle.write("1056338697_4f7d7ce270.jpg\tno tabs here\n")
    cases = {"flickr8k-expert": (tmp_path / "empty", ["Flickr8k.token.txt", "docs/clip_score.md"]),
             "composite": (tmp_path / "empty", ["8k_correctness.csv"]),
             "pascal50s": (tmp_path / "empty", ["pair_pascal.mat"]),
             "foil": (tmp_path / "absent", ["--data", "is not a folder"])}
    for benchmark, (data, words) in cases.items():
        with pytest.raises(SystemExit) as exit_:
            run(benchmark, data, micro, tmp_path)
        assert "\n" not in exit_.value.code and all(w in exit_.value.code for w in words), exit_.value.code
    with pytest.raises(SystemExit, match=r"ExpertAnnotations.txt:8: 2 tab-separated fields, expected 5"):
        run("flickr8k-expert", bad, micro, tmp_path)


def test_an_unreadable_image_is_skipped_and_counted_or_strict(micro, tmp_path):
    root = write_flickr8k(tmp_path / "flickr8k")
    (root / "Flicker8k_Dataset" / F8K[1]).write_bytes(b"not a jpeg")
    report = run("flickr8k-expert", root, micro, tmp_path)
    assert report["skipped"]["count"] == 1 and report["n"] == 12  # image 1's two pairs, three experts each
    with pytest.raises(SystemExit, match=r"cannot be decoded.*drop --strict"):
        run("flickr8k-expert", root, micro, tmp_path, "--strict")


def test_captions_over_the_context_are_counted(tmp_path, micro, capsys):
    bpe = open_clip.get_tokenizer("ViT-B-32")  # OpenAI's CLIP: 77 tokens, start and end included
    assert bpe.context_length == 77 and len(bpe.encode(cs.PREFIX)) == 3
    at_limit, over = "dog " * 72, "dog " * 73  # 1 + 3 + 72 + 1 = 77 tokens; 78
    assert bpe([cs.PREFIX + at_limit])[0, -2:].tolist() == [bpe.encode("dog")[0], bpe.eot_token_id]
    assert count_truncated(bpe, ["a dog.", at_limit, over, "a red kite " * 40]) == 2
    assert count_truncated(bpe, ["a dog.", "two cats on a mat"]) == 0
    assert count_truncated(object(), ["a dog"]) is None  # a tokenizer that cannot say
    # what the cut does to a score: two captions that differ only past it score the same
    picture(tmp_path / "img.jpg", 0)
    ends = cs.clip_s(micro[0], [str(tmp_path / "img.jpg")] * 3, [LONG + " on the moon", LONG + " under a red sky",
                                                                  "a dog at the end"], progress=False)["per_sample"]
    assert ends[0] == ends[1] != ends[2]
    # the manifest command: counted in the JSON, one warning line (the micro model's context: 48 tokens)
    for i in range(3):
        picture(tmp_path / f"img{i}.jpg", i)
    rows = [{"id": "s0", "image": str(tmp_path / "img0.jpg"), "caption": LONG, "refs": ["a dog.", LONG]},
            {"id": "s1", "image": str(tmp_path / "img1.jpg"), "caption": "a cat.", "refs": ["a cat."]},
            {"id": "s2", "image": str(tmp_path / "img2.jpg"), "caption": "a kite.", "refs": ["a kite."]}]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    report = main(["--manifest", str(manifest), "--refs-field", "refs", "--model", MICRO, "--pretrained", micro[1],
                   "--device", "cpu", "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["truncated"] == report["truncated"] == {
        "context_length": 48, "candidates": 1, "of_candidates": 3, "references": 1, "of_references": 4}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 of 3 candidates and 1 of 4 references exceed the model's 48-token" in warnings[0]
    write_manifest(manifest, rows[1:])
    main(["--manifest", str(manifest), "--model", MICRO, "--pretrained", micro[1], "--device", "cpu", "--out",
          str(tmp_path / "s.json")])
    assert "warning:" not in capsys.readouterr().err  # nothing cut, nothing said
