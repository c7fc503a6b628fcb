"""Readers of the human-judgment benchmarks as distributed: Flickr8k-Expert, Flickr8k-CF, Composite, Pascal-50S, FOIL.

Each reader takes the benchmark's folder as its authors distribute it (docs/clip_score.md lists the files and the
layouts looked for) and returns the judged captions as the CLIPScore paper evaluates them: `Judgments` (Likert
ratings: Flickr8k-Expert, Flickr8k-CF, Composite) or `Pairs` (the preferred caption of a pair: Pascal-50S, FOIL),
with the reader's counts in `notes`. A missing file or a line in another format is a BenchmarkDataError naming
the file (and line). common/human_judgments.py scores them (the `correlate` command).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.clip_score import _one_line


class BenchmarkDataError(ValueError):
    """A benchmark file that is missing or not in its distributed format; the message names the file."""


@dataclass
class Judgments:
    """Likert judgments, one row per human rating (Flickr8k-Expert's three experts make three rows)."""

    images: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    ratings: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def add(self, image: Path, candidate: str, refs: Sequence[str], rating: float) -> None:
        """One rating; texts with their whitespace collapsed, as clipscore's flickr8k_example scores them."""
        self.images.append(image)
        self.candidates.append(_clean(candidate))
        self.refs.append([_clean(ref) for ref in refs])
        self.ratings.append(float(rating))


@dataclass
class Pairs:
    """Pairwise judgments: per pair the caption people preferred, the other one, references and a category."""

    images: list = field(default_factory=list)
    preferred: list = field(default_factory=list)
    other: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    categories: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def add(self, image: Path, preferred: str, other: str, refs: Sequence[str], category: str) -> None:
        self.images.append(image)
        self.preferred.append(_clean(preferred))
        self.other.append(_clean(other))
        self.refs.append([_clean(ref) for ref in refs])
        self.categories.append(category)


def _clean(text: Any) -> str:
    """Whitespace collapsed (' '.join(text.split())), as clipscore's flickr8k_example does before scoring."""
    return " ".join(str(text).split())


def _find(data: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (paths relative to `data`) that exists: the layouts the data sets ship in vary."""
    for name in names:
        if (data / name).exists():
            return data / name
    raise BenchmarkDataError(f"{what}: none of {', '.join(names)} in {data} (docs/clip_score.md lists the files)")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: not valid JSON ({err})") from err


def _tab_rows(path: Path, columns: int):
    """(line number, fields) of a tab-separated annotation file, every row `columns` fields wide."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                fields = line.strip("\r\n").split("\t")
                if len(fields) != columns:
                    raise BenchmarkDataError(f"{path}:{line_no}: {len(fields)} tab-separated fields, "
                                             f"expected {columns}")
                yield line_no, [value.strip() for value in fields]


def read_flickr_tokens(path: Path) -> dict[str, str]:
    """Flickr8k.token.txt (or Flickr30k's results_20130124.token): caption id "<image>#<k>" -> caption."""
    return {caption_id: caption for _, (caption_id, caption) in _tab_rows(path, 2)}


def _refs_by_stem(captions: dict[str, str]) -> dict[str, list[str]]:
    """References per image, keyed as clipscore's download.py keys them: the file name up to its first '.'."""
    refs = defaultdict(list)
    for caption_id, caption in captions.items():
        refs[caption_id.split("#")[0].split(".")[0]].append(caption)
    return refs


def _caption(captions: dict[str, str], caption_id: str, path: Path, line_no: int) -> str:
    if caption_id not in captions:
        raise BenchmarkDataError(f"{path}:{line_no}: caption id {caption_id!r} is not in Flickr8k.token.txt")
    return captions[caption_id]


FLICKR8K_TEXT = ("", "Flickr8k_text")  # Flickr8k_text.zip unpacked here or into its own folder
FLICKR8K_IMAGES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")  # the zip's folder is spelt "Flicker"


def _flickr8k_text(data: Path, name: str) -> Path:
    return _find(data, [str(Path(folder) / name) for folder in FLICKR8K_TEXT], f"Flickr8k's {name}")


def read_clipscore_json(path: Path, data: Path) -> Judgments:
    """clipscore's flickr8k.json / crowdflower_flickr8k.json (written by its flickr8k_example/download.py; the
    folder aimagelab/pacscore links holds them): {image: {"image_path", "ground_truth", "human_judgement":
    [{"caption", "rating"}, ...]}}, one judgment per rating, NaN ratings skipped as there."""
    images, out = _find(data, FLICKR8K_IMAGES, "Flickr8k images"), Judgments()
    for entry in _load_json(path).values():
        for judgment in entry["human_judgement"]:
            if not math.isnan(judgment["rating"]):
                out.add(images / Path(entry["image_path"]).name, judgment["caption"], entry["ground_truth"],
                        judgment["rating"])
    out.notes["source"] = path.name
    return out


def read_flickr8k_expert(data: Path) -> Judgments:
    """Flickr8k-Expert as clipscore's flickr8k_example prepares it: each of the three experts' ratings (1-4) is a
    row (5664 pairs, 16992 rows: "method A" of the CLIPScore paper, App. A); a candidate that is one of its image's
    own references is dropped (158 pairs, the SPICE paper's convention); the references are the image's captions."""
    if not any((data / folder / "ExpertAnnotations.txt").exists() for folder in FLICKR8K_TEXT):
        if (data / "flickr8k.json").exists():
            return read_clipscore_json(data / "flickr8k.json", data)
    captions = read_flickr_tokens(_flickr8k_text(data, "Flickr8k.token.txt"))
    refs, path = _refs_by_stem(captions), _flickr8k_text(data, "ExpertAnnotations.txt")
    images, out, dropped = _find(data, FLICKR8K_IMAGES, "Flickr8k images"), Judgments(), 0
    for line_no, (image, caption_id, *experts) in _tab_rows(path, 5):
        caption, stem = _caption(captions, caption_id, path, line_no), image.split(".")[0]
        if caption in refs[stem]:
            dropped += 1
            continue
        for rating in experts:
            out.add(images / image, caption, refs[stem], float(rating))
    out.notes.update(source=path.name, candidates_in_own_references_dropped=dropped)
    return out


def read_flickr8k_cf(data: Path) -> Judgments:
    """Flickr8k-CF as clipscore's flickr8k_example prepares it: the rating is the fraction of CrowdFlower "yes"
    votes; every candidate that is one of its image's references is removed from that image's references."""
    if not any((data / folder / "CrowdFlowerAnnotations.txt").exists() for folder in FLICKR8K_TEXT):
        if (data / "crowdflower_flickr8k.json").exists():
            return read_clipscore_json(data / "crowdflower_flickr8k.json", data)
    captions = read_flickr_tokens(_flickr8k_text(data, "Flickr8k.token.txt"))
    refs, path = _refs_by_stem(captions), _flickr8k_text(data, "CrowdFlowerAnnotations.txt")
    rows, rated_refs = [], defaultdict(set)
    for line_no, (image, caption_id, yes, _, _) in _tab_rows(path, 5):
        caption, stem = _caption(captions, caption_id, path, line_no), image.split(".")[0]
        if caption in refs[stem]:
            rated_refs[stem].add(caption)
        rows.append((image, stem, caption, float(yes)))
    images, out = _find(data, FLICKR8K_IMAGES, "Flickr8k images"), Judgments()
    for image, stem, caption, rating in rows:
        kept = [ref for ref in refs[stem] if ref not in rated_refs[stem]]
        if not kept:
            raise BenchmarkDataError(f"{path}: image {image} has no reference left once its rated captions are removed")
        if not math.isnan(rating):
            out.add(images / image, caption, kept, rating)
    out.notes.update(source=path.name, references_removed=sum(len(v) for v in rated_refs.values()))
    return out


def _words(text: str) -> str:
    """Lower-cased words without punctuation: how two copies of one caption (AMT's, COCO's) are compared."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _without_rated_reference(refs: Sequence[str], candidates: Sequence[str]) -> tuple[list[str], bool]:
    """The references less the one that is also a rated candidate, and whether it matched word for word.

    In Composite one rated caption per image was drawn from the image's references, and FOIL's true caption is
    one of its image's COCO captions: the CLIPScore paper removes it (Sec. 4.1 and App. A: the harder setting;
    4.4). Nothing marks which it is: a reference equal to a candidate word for word, else the most similar one
    (difflib's ratio), is dropped.
    """
    refs = list(refs)
    if not refs:
        return [], False
    wanted = {_words(candidate) for candidate in candidates}
    for i, ref in enumerate(refs):
        if _words(ref) in wanted:
            return refs[:i] + refs[i + 1:], True
    ratio = [max(difflib.SequenceMatcher(None, _words(ref), c).ratio() for c in wanted) for ref in refs]
    best = int(np.argmax(ratio))
    return refs[:best] + refs[best + 1:], False


def _url_name(url: str) -> str:
    return url.strip().split("?")[0].rstrip("/").split("/")[-1]


def _composite_flickr8k(data: Path) -> Callable[[str], tuple[Path, list[str]] | None]:
    """An 8k_correctness.csv image URL (a Flickr photo, <photo id>_<secret>.jpg) -> its Flickr8k file and captions."""
    captions = read_flickr_tokens(_flickr8k_text(data, "Flickr8k.token.txt"))
    refs = _refs_by_stem(captions)
    images = _find(data, ("flickr8k_images",) + FLICKR8K_IMAGES, "Composite's Flickr8k images")
    by_photo = {name.split("_")[0]: name for name in (cid.split("#")[0] for cid in captions) if name.endswith(".jpg")}

    def lookup(url: str) -> tuple[Path, list[str]] | None:
        name = by_photo.get(_url_name(url).split("_")[0])
        return None if name is None else (images / name, refs[name.split(".")[0]])

    return lookup


def _composite_flickr30k(data: Path) -> Callable[[str], tuple[Path, list[str]] | None]:
    """A 30k_correctness.csv image URL (<image id>.jpg) -> its Flickr30k file and captions (results_20130124.token)."""
    tokens = _find(data, ("results_20130124.token", "flickr30k/results_20130124.token"), "Flickr30k's captions")
    refs = _refs_by_stem(read_flickr_tokens(tokens))
    images = _find(data, ("flickr30k_images", "flickr30k-images"), "Composite's Flickr30k images")

    def lookup(url: str) -> tuple[Path, list[str]] | None:
        stem = _url_name(url).split(".")[0]
        return (images / f"{stem}.jpg", refs[stem]) if stem in refs else None

    return lookup


def _coco_refs(data: Path) -> dict[int, list[str]]:
    """COCO's captions_val2014.json: image id -> its captions (5, sometimes 6 or 7)."""
    path = _find(data, ("captions_val2014.json", "annotations/captions_val2014.json"), "COCO's captions")
    refs = defaultdict(list)
    for annotation in _load_json(path)["annotations"]:
        refs[int(annotation["image_id"])].append(annotation["caption"])
    return refs


def _composite_coco(data: Path) -> Callable[[str], tuple[Path, list[str]] | None]:
    """A coco_correctness.csv image URL (COCO_val2014_<id>.jpg) -> its COCO file and captions."""
    refs, images = _coco_refs(data), _find(data, ("mscoco_images", "val2014"), "Composite's COCO images")

    def lookup(url: str) -> tuple[Path, list[str]] | None:
        numbers = re.findall(r"\d+", _url_name(url).split(".")[0])
        image_id = int(numbers[-1]) if numbers else None
        return (images / f"COCO_val2014_{image_id:012d}.jpg", refs[image_id]) if image_id in refs else None

    return lookup


# subset: (AMT file, captions per row, its reference lookup). The files' rows hold 3 (8k) or 4 captions, but the
# first three are the rated set every study uses: 3 x (997 + 991 + 2007) images = 11985, the CLIPScore paper's 12K.
COMPOSITE_SUBSETS = {"flickr8k": ("8k_correctness.csv", 3, _composite_flickr8k),
                     "flickr30k": ("30k_correctness.csv", 4, _composite_flickr30k),
                     "coco": ("coco_correctness.csv", 4, _composite_coco)}
COMPOSITE_RATED = 3


def _composite_rows(path: Path, n_captions: int) -> tuple[list[tuple[str, list[str], list[float]]], int]:
    """(image URL, captions, ratings) per row of an AMT csv, and how many rows were skipped.

    The files are ';'-separated with one header row; each row holds the HIT's fields, the image URL (column 27)
    and then its captions and their ratings (1-5). The URL is found as the first cell that is one; a row without
    one, or without a number where a rating should be (the files end with such rows), is skipped and counted.
    """
    rows, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=";")
        next(reader, None)
        for row in reader:
            at = next((i for i, cell in enumerate(row) if re.match(r"\s*https?://", cell, re.IGNORECASE)), None)
            cells = row[at + 1:at + 1 + 2 * n_captions] if at is not None else []
            try:
                ratings = [float(cell) for cell in cells[n_captions:]]
            except ValueError:
                ratings = []
            if len(ratings) != n_captions:
                skipped += 1
                continue
            rows.append((row[at], cells[:n_captions], ratings))
    return rows, skipped


def read_composite(data: Path) -> Judgments:
    """Composite (Aditya et al. 2015) as the CLIPScore paper evaluates it: the three rated captions of each image,
    references from the source data sets less the rated one (Sec. 4.1, App. A)."""
    out = Judgments()
    for subset, (name, n_captions, references) in COMPOSITE_SUBSETS.items():
        path = _find(data, (name, f"AMT_eval/{name}"), f"Composite's {subset} judgments")
        rows, skipped = _composite_rows(path, n_captions)
        lookup, unknown, inexact = references(data), 0, 0
        for url, captions, ratings in rows:
            found = lookup(url)
            if found is None:
                unknown += 1
                continue
            refs, exact = _without_rated_reference(found[1], captions[:COMPOSITE_RATED])
            inexact += not exact
            for caption, rating in zip(captions[:COMPOSITE_RATED], ratings[:COMPOSITE_RATED]):
                out.add(found[0], caption, refs, rating)
        out.notes[subset] = {"rows": len(rows), "rows_skipped": skipped, "images_without_references": unknown,
                             "rated_reference_removed_by_similarity": inexact}
    return out


PASCAL_CATEGORIES = {1: "HC", 2: "HI", 3: "HM", 4: "MM"}
PASCAL_FOLDERS = ("", "pyCIDErConsensus")
PASCAL_IMAGES = ("images", "JPEGImages", "VOCdevkit/VOC2010/JPEGImages", "VOC2010/JPEGImages")


def _loadmat(path: Path) -> dict:
    """A MATLAB file through scipy (imported here: only Pascal-50S needs it)."""
    try:
        from scipy.io import loadmat
    except ModuleNotFoundError as err:
        raise BenchmarkDataError(f"reading {path.name} needs scipy (pip install 'scipy>=1.11')") from err
    try:
        return loadmat(path)
    except (ValueError, OSError, NotImplementedError) as err:
        raise BenchmarkDataError(f"{path}: not a MATLAB file scipy can read ({_one_line(err)})") from err


def _mat_value(value: Any) -> Any:
    """A MATLAB char array or cell as loadmat gives it (arrays of one element, nested) down to its str or number."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    return str(value).strip() if isinstance(value, str) else value


def _mat_fields(entry: Any) -> list:
    """The fields of one element of a struct array (or the cells of one cell-array row), unwrapped."""
    cells = list(entry) if isinstance(entry, np.void) else np.asarray(entry, dtype=object).reshape(-1)
    return [_mat_value(cell) for cell in cells]


def _mat_array(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        names = ", ".join(name for name in mat if not name.startswith("__"))
        raise BenchmarkDataError(f"{path}: no variable {key!r} (its variables: {names})")
    return np.asarray(mat[key]).reshape(-1)


def _pascal_votes(triplets: np.ndarray) -> tuple[dict[str, int], list[str]]:
    """One pair's consensus judgments: votes per winning caption, and the references the raters were shown.

    consensus_pascal.mat's triplets are (reference, caption B, caption C, winner), winner 1 meaning B; as in the
    code jmhessel/clipscore's issue 4 shares, each pair has 48 consecutive triplets."""
    votes, refs = defaultdict(int), []
    for triplet in triplets:
        ref, b, c, winner = _mat_fields(triplet)[:4]
        votes[_clean(b if int(winner) == 1 else c)] += 1
        refs.append(ref)
    return votes, refs


def read_pascal50s(data: Path, seed: int = 0) -> Pairs:
    """Pascal-50S (Vedantam et al. 2015) as the CLIPScore paper evaluates it (Sec. 4.2): the 4000 pairs of
    pair_pascal.mat, the caption preferred by most of the 48 judgments of consensus_pascal.mat counting as right,
    ties broken at random (`seed`); each pair's 48 references are kept for the draws of 5 made when scoring."""
    pair_path = _find(data, [str(Path(f) / "pair_pascal.mat") for f in PASCAL_FOLDERS], "Pascal-50S's pairs")
    vote_path = _find(data, [str(Path(f) / "consensus_pascal.mat") for f in PASCAL_FOLDERS], "Pascal-50S's judgments")
    pairs = _loadmat(pair_path)
    entries, categories = _mat_array(pairs, "new_input", pair_path), _mat_array(pairs, "category", pair_path)
    triplets = _mat_array(_loadmat(vote_path), "triplets", vote_path)
    if not len(entries) or len(triplets) % len(entries) or len(categories) != len(entries):
        raise BenchmarkDataError(f"{vote_path}: {len(triplets)} judgments for {len(entries)} pairs and "
                                 f"{len(categories)} categories in {pair_path.name}: files of different releases?")
    per_pair, images = len(triplets) // len(entries), _find(data, PASCAL_IMAGES, "Pascal-50S's images (VOC2010)")
    rng, out, unmatched, ties = np.random.default_rng(seed), Pairs(), 0, 0
    for i, (entry, category) in enumerate(zip(entries, categories)):
        image, a, b = _mat_fields(entry)[:3]
        votes, refs = _pascal_votes(triplets[i * per_pair:(i + 1) * per_pair])
        a_votes, b_votes = votes.get(_clean(a), 0), votes.get(_clean(b), 0)
        unmatched += a_votes + b_votes != per_pair
        ties += a_votes == b_votes
        a_wins = a_votes > b_votes or (a_votes == b_votes and rng.random() < 0.5)
        category = int(_mat_value(category))
        if category not in PASCAL_CATEGORIES:
            raise BenchmarkDataError(f"{pair_path}: pair {i} has category {category}, not one of 1-4")
        out.add(images / image, a if a_wins else b, b if a_wins else a, refs, PASCAL_CATEGORIES[category])
    out.notes.update(judgments_per_pair=per_pair, vote_ties_broken_at_random=ties,
                     pairs_with_votes_for_other_captions=unmatched)
    return out


def _foil_groups(path: Path) -> tuple[dict, dict[int, str]]:
    """FOIL's annotations grouped by id, the id a true caption shares with its foils: {id: {"image_id", "true":
    [captions], "foil": [captions]}}, and the images' file names."""
    foil = _load_json(path)
    groups = defaultdict(lambda: {"true": [], "foil": []})
    for annotation in foil["annotations"]:
        group = groups[annotation["id"]]
        group["image_id"] = int(annotation["image_id"])
        group["foil" if annotation["foil"] else "true"].append(annotation["caption"])
    return groups, {int(image["id"]): image["file_name"] for image in foil.get("images", [])}


FOIL_MAX_REFS = 4  # the CLIPScore paper's 4-ref setting (COCO images with 6 or 7 captions keep 4)


def read_foil(data: Path, seed: int = 0) -> Pairs:
    """FOIL-COCO (Shekhar et al. 2017) as the CLIPScore paper evaluates it (Sec. 4.4): per test image one (true,
    foil) pair, drawn at random (`seed`); references: the image's COCO captions less the true one, up to four (the
    first one alone for 1-ref)."""
    groups, file_names = _foil_groups(_find(data, ("foilv1.0_test_2017.json",), "FOIL's test annotations"))
    refs, images = _coco_refs(data), _find(data, ("val2014", "mscoco_images", "images"), "COCO val2014 images")
    by_image = defaultdict(list)
    for group in groups.values():
        if len(group["true"]) == 1 and group["foil"]:
            by_image[group["image_id"]].append(group)
    rng, out, inexact, no_refs = np.random.default_rng(seed), Pairs(), 0, 0
    for image_id in sorted(by_image):
        group = by_image[image_id][rng.integers(len(by_image[image_id]))]
        true, foil = group["true"][0], group["foil"][rng.integers(len(group["foil"]))]
        kept, exact = _without_rated_reference(refs.get(image_id, []), [true])
        if not kept:
            no_refs += 1
            continue
        inexact += not exact
        name = file_names.get(image_id, f"COCO_val2014_{image_id:012d}.jpg")
        out.add(images / name, true, foil, kept[:FOIL_MAX_REFS], "FOIL")
    out.notes.update(annotation_groups=len(groups), images_without_a_pair=len({g["image_id"] for g in groups.values()})
                     - len(by_image), images_without_references=no_refs, true_caption_removed_by_similarity=inexact)
    return out
