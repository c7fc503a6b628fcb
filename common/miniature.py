"""The miniature world: a seeded, synthetic image-caption world in which every paper's mechanism shows.

Why it exists: a fresh machine here can download no model weights and no data set, and a student
wants to watch a method work in minutes on a laptop. So the project ships this generator.

What it is. Each 64x64 image holds one or two objects on a textured background. An object has a
shape, a colour, a size and a position, and may carry an emblem: a distinctive pattern (stripes,
dots, checks, ...) that carries a proper name ("the Aldora emblem"), the stand-in for the world
knowledge web alt-text has and captioners lack (celebrities, landmarks). Per pixel there is a
class mask (background or the shape's class) and a depth map (a ground plane, objects in front),
for the dense probes. Per image there are caption variants, each a controlled caricature:

- `caption`: the ground truth, fluent and complete, names included;
- `alt_text`: web-like: keeps the names (`alt_name_keep`), keeps each attribute word with
  `alt_attr_keep`, no grammar, web boilerplate (`alt_spam`), and with `alt_offtopic` it describes
  some other, random scene;
- `synthetic_caption`: captioner-like: fluent, generic, never knows a name (describes the emblem's
  pattern at most), drops sizes and positions, and replaces one attribute of an object with a
  wrong one at rate `syn_hallucination`; `synthetic_captions` holds `n_synthetic` independent
  draws (DataCompDR keeps five per image), the first being `synthetic_caption`;
- `refs`: `n_refs` human references that vary in specificity as COCO's five do
  (`reference_captions`), for RefCLIP-S / RefPAC-S and for training captioners;
- `fused`: what a strong LLM would write from alt-text + synthetic caption (CapsFusion's teacher,
  VeCLIP's LLM-VeC), a function of those two texts only (`teacher_fusion`), except that the LLM
  forgets each name with probability `llm_forget`: the synthetic caption's sentence, each
  name of the alt-text attached to the object whose described pattern is that name's emblem
  (world knowledge, as an LLM knows a landmark), else to the first object without a name whose
  description does not contradict it (so off-topic alt-text can leak a wrong name, as real fusion
  does, and a name can land on the wrong one of two objects); a colour or shape the alt-text
  contradicts replaced by the alt-text's word when the swap is unambiguous; an alt-text that
  contradicts the caption in two attribute words is taken to be about another image and ignored.

And the labels (`objects`, `background`) to score a caption: which names it keeps
(`names_kept`), which attribute words it hallucinates (`hallucinated_words`), and zero-shot
classification tasks for attributes and for named entities (`zero_shot_tasks`).

What it cannot show: anything about real language or real images. Its vocabulary is a few dozen
words, its captions come from templates, its noise is independent and stationary, and a model
that learns it has learned nothing about the world. It is a controlled experiment: a paper's
mechanism can be seen working (or not) here, and a knob can break it on purpose; its numbers are
not evidence about the papers' data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np
from PIL import Image

from common.data import write_manifest

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
          "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"grass": (90, 150, 70), "sand": (210, 190, 140), "water": (70, 130, 180),
               "snow": (215, 225, 235), "night": (30, 35, 70)}
SIZES = {"small": 7.0, "large": 13.0}  # object radius in pixels at 64x64
PATTERNS = ("stripes", "bars", "dots", "checks", "rings", "diagonals")
PATTERN_INKS = {"light": (250, 250, 250), "dark": (15, 15, 15)}
ENTITY_NAMES = ("Aldora", "Brimvale", "Castellan", "Dunmore", "Elbrook", "Fenwick",
                "Galloway", "Harrowgate", "Ivanhoe", "Jorvik", "Kestrel", "Lindqvist")
# Entity i carries pattern i % 6 in ink i // 6: twelve emblems, each telling one name.
ENTITIES = {name: (PATTERNS[i % len(PATTERNS)], tuple(PATTERN_INKS)[i // len(PATTERNS)])
            for i, name in enumerate(ENTITY_NAMES)}
SPAM = ("stock photo", "free download", "hd wallpaper", "buy now", "best price", "jpg", "click here",
        "royalty free", "new arrival", "high quality")
SEGMENTATION_CLASSES = ("background",) + SHAPES  # mask value k is class k
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class WorldConfig:
    """The knobs of the miniature world (every default documented in README.md)."""

    seed: int = 0
    """master seed: the same config gives the same bytes"""
    n_train: int = 5000
    """training images"""
    n_val: int = 500
    """validation images"""
    n_test: int = 1000
    """test images"""
    image_size: int = 64
    """side of the square images in pixels"""
    max_objects: int = 2
    """objects per image are drawn uniformly from 1..max_objects (1 or 2)"""
    entity_rate: float = 0.5
    """probability that an object carries a named emblem"""
    alt_name_keep: float = 0.9
    """probability that the alt-text mentions an emblem's name"""
    alt_attr_keep: float = 0.5
    """probability that each attribute word (colour, shape, size, background) survives into the alt-text"""
    alt_offtopic: float = 0.15
    """probability that the alt-text describes a different, random scene"""
    alt_spam: float = 0.6
    """probability that the alt-text carries web boilerplate ("stock photo", "IMG_1234")"""
    syn_hallucination: float = 0.2
    """per object, probability that the synthetic caption replaces its colour or shape with a wrong one"""
    syn_pattern_mention: float = 0.5
    """probability that the synthetic caption describes an emblem's pattern (never its name)"""
    n_synthetic: int = 5
    """independent synthetic captions per image (DataCompDR keeps 5)"""
    n_refs: int = 5
    """human references per image (`refs`, COCO has 5), each from an annotator of its own specificity"""
    llm_forget: float = 0.25
    """probability that the LLM's fusion (`fused`) leaves out a name the alt-text gives (rewriting loses knowledge)"""
    noise: float = 8.0
    """standard deviation of the pixel noise (0-255 scale)"""

    def __post_init__(self):
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        for name in ("entity_rate", "alt_name_keep", "alt_attr_keep", "alt_offtopic", "alt_spam",
                     "syn_hallucination", "syn_pattern_mention", "llm_forget"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if (self.n_synthetic < 1 or self.n_refs < 1 or min(self.n_train, self.n_val, self.n_test) < 0
                or self.image_size < 16):
            raise ValueError("need n_synthetic >= 1, n_refs >= 1, non-negative split sizes and image_size >= 16")

    def digest(self) -> str:
        """A short hash naming this world's cache folder."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True) + f"v{WORLD_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


WORLD_VERSION = 4  # bump when the generator changes, so stale caches are rebuilt


# ---------------------------------------------------------------------------------------------
# Scenes: what is in an image
# ---------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> dict:
    """Draw a scene: background and 1-2 objects with attributes, emblem, centre and depth."""
    n_objects = int(rng.integers(1, cfg.max_objects + 1))
    positions = ["center"] if n_objects == 1 else ["left", "right"]
    if n_objects == 1 and rng.random() < 2 / 3:
        positions = [("left", "right")[int(rng.integers(2))]]
    objects = []
    for position in positions:
        size = ("small", "large")[int(rng.integers(2))]
        entity = str(rng.choice(ENTITY_NAMES)) if rng.random() < cfg.entity_rate else None
        # an emblem in light ink is invisible on a white object, dark ink on a black one
        hidden = {None: None, "light": "white", "dark": "black"}[ENTITIES[entity][1] if entity else None]
        color = str(rng.choice([c for c in COLORS if c != hidden]))
        objects.append({"shape": str(rng.choice(SHAPES)), "color": color,
                        "size": size, "entity": entity, "position": position})
    if n_objects == 2 and objects[0]["entity"] is not None and objects[0]["entity"] == objects[1]["entity"]:
        objects[1]["entity"] = None  # a name is unique in a scene
    return {"background": str(rng.choice(list(BACKGROUNDS))), "objects": objects}


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if shape == "triangle":  # apex up: inside when below the two slanted edges and above the base
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        arm = r * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float) -> np.ndarray:
    dx, dy = (xx - cx).astype(int), (yy - cy).astype(int)
    if pattern == "stripes":
        return (dy // 2) % 2 == 0
    if pattern == "bars":
        return (dx // 2) % 2 == 0
    if pattern == "checks":
        return ((dx // 3) + (dy // 3)) % 2 == 0
    if pattern == "dots":
        return (dx % 4 < 2) & (dy % 4 < 2)
    if pattern == "rings":
        return (np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) // 2) % 2 == 0
    if pattern == "diagonals":
        return ((dx + dy) // 2) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}")


def render_scene(scene: dict, rng: np.random.Generator, cfg: WorldConfig):
    """Draw a scene: (image uint8 (H, W, 3), class mask uint8 (H, W), depth in metres float32 (H, W))."""
    size = cfg.image_size
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUNDS[scene["background"]]
    mask = np.zeros((size, size), np.uint8)
    depth = 10.0 - 8.0 * yy / (size - 1)  # a ground plane: far (10 m) at the top, near (2 m) at the bottom
    centres = {"left": 0.28, "right": 0.72, "center": 0.5}
    placed = []
    for obj in scene["objects"]:
        radius = SIZES[obj["size"]] * scale * float(rng.uniform(0.9, 1.1))
        cx = centres[obj["position"]] * size + float(rng.uniform(-3, 3)) * scale
        cy = size * float(rng.uniform(0.38, 0.62))
        distance = (3.0 if obj["size"] == "large" else 5.0) + float(rng.uniform(-0.5, 0.5))
        placed.append((distance, obj, cx, cy, radius))
    for distance, obj, cx, cy, radius in sorted(placed, key=lambda item: -item[0]):  # far first
        inside = _shape_mask(obj["shape"], xx, yy, cx, cy, radius)
        image[inside] = COLORS[obj["color"]]
        if obj["entity"] is not None:
            pattern, ink = ENTITIES[obj["entity"]]
            image[inside & _pattern_mask(pattern, xx, yy, cx, cy)] = PATTERN_INKS[ink]
        mask[inside] = SEGMENTATION_CLASSES.index(obj["shape"])
        depth[inside] = distance
    image += rng.normal(0.0, cfg.noise, image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask, depth.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Caption variants: ground truth, alt-text, synthetic, teacher fusion
# ---------------------------------------------------------------------------------------------


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else f"{phrases[0]} and {phrases[1]}"


def ground_truth_caption(scene: dict) -> str:
    """The complete, fluent description: sizes, colours, shapes, names, positions, background."""
    phrases = []
    for obj in scene["objects"]:
        phrase = f"a {obj['size']} {obj['color']} {obj['shape']}"
        if obj["entity"]:
            phrase += f" with the {obj['entity']} emblem"
        where = "in the center" if obj["position"] == "center" else f"on the {obj['position']}"
        phrases.append(f"{phrase} {where}")
    return f"{_join(phrases)}, on {scene['background']}."


SWAP_TYPES = ("color", "shape", "size", "position", "background", "name", "binding")


def swapped_captions(record: dict, rng: np.random.Generator) -> dict[str, str]:
    """The ground-truth caption with one thing changed, per swap type (a SugarCrepe-style test of a scorer).

    color/shape/size: one object's attribute replaced by another value; position: one object moved (two
    objects: their places exchanged); background: another background; name: an emblem's name replaced by
    another (images with an emblem); binding: the two objects' colours exchanged, the same words said of the
    wrong objects (images with two differently coloured objects). A type that does not apply is absent.
    """
    scene = {"background": record["background"], "objects": [dict(o) for o in record["objects"]]}
    objects = scene["objects"]
    out = {}

    def with_change(change) -> str:
        changed = {"background": scene["background"], "objects": [dict(o) for o in objects]}
        change(changed)
        return ground_truth_caption(changed)

    target = int(rng.integers(len(objects)))
    for key, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES)):
        other = str(rng.choice([v for v in values if v != objects[target][key]]))
        out[key] = with_change(lambda s, key=key, other=other: s["objects"][target].update({key: other}))
    if len(objects) == 2:
        out["position"] = with_change(lambda s: [o.update(position={"left": "right", "right": "left"}[o["position"]])
                                                 for o in s["objects"]])
    else:
        moved = str(rng.choice([p for p in ("left", "right", "center") if p != objects[0]["position"]]))
        out["position"] = with_change(lambda s: s["objects"][0].update(position=moved))
    other = str(rng.choice([b for b in BACKGROUNDS if b != scene["background"]]))
    out["background"] = with_change(lambda s: s.update(background=other))
    named = [i for i, o in enumerate(objects) if o["entity"]]
    if named:
        i = named[int(rng.integers(len(named)))]
        taken = {o["entity"] for o in objects}
        name = str(rng.choice([n for n in ENTITY_NAMES if n not in taken]))
        out["name"] = with_change(lambda s: s["objects"][i].update(entity=name))
    if len(objects) == 2 and objects[0]["color"] != objects[1]["color"]:
        a, b = objects[0]["color"], objects[1]["color"]
        out["binding"] = with_change(lambda s: (s["objects"][0].update(color=b), s["objects"][1].update(color=a)))
    return out


def reference_captions(scene: dict, rng: np.random.Generator, n_refs: int) -> list[str]:
    """Human references that vary in specificity, as COCO's five do.

    Each annotator has a level of detail d ~ U(0, 1) and states each detail (an object's size, colour, emblem name
    and place, the background) with probability d; the shape, the head noun, is always said. So some references
    are generic ("a circle and a square."), some nearly complete, and a captioner trained on them by maximum
    likelihood learns their generic mean (the reason DiCO gives for optimising a CLIP reward instead).
    """
    refs = []
    for _ in range(n_refs):
        detail = rng.random()
        phrases = []
        for obj in scene["objects"]:
            words = [obj[key] for key in ("size", "color") if rng.random() < detail] + [obj["shape"]]
            phrase = "a " + " ".join(words)
            if obj["entity"] and rng.random() < detail:
                phrase += f" with the {obj['entity']} emblem"
            if rng.random() < detail:
                phrase += " in the center" if obj["position"] == "center" else f" on the {obj['position']}"
            phrases.append(phrase)
        background = f", on {scene['background']}" if rng.random() < detail else ""
        refs.append(f"{_join(phrases)}{background}.")
    return refs


def alt_text(scene: dict, rng: np.random.Generator, cfg: WorldConfig) -> tuple[str, bool]:
    """Web-like alt-text and whether it is off-topic: names kept, attributes dropped, no grammar, spam."""
    offtopic = rng.random() < cfg.alt_offtopic
    source = sample_scene(rng, dataclasses.replace(cfg, entity_rate=max(cfg.entity_rate, 0.5))) if offtopic else scene
    words = []
    for obj in source["objects"]:
        if obj["entity"] and rng.random() < cfg.alt_name_keep:
            words.append(obj["entity"])
        words += [obj[key] for key in ("size", "color", "shape") if rng.random() < cfg.alt_attr_keep]
    if rng.random() < cfg.alt_attr_keep:
        words.append(source["background"])
    rng.shuffle(words)
    if rng.random() < cfg.alt_spam:
        spam = str(rng.choice(SPAM)) if rng.random() < 0.5 else f"IMG_{int(rng.integers(1000, 10000))}"
        words.insert(int(rng.integers(len(words) + 1)), spam)
    if not words:  # web alt-text is never empty in a manifest; a file name is what is left
        words = [f"IMG_{int(rng.integers(1000, 10000))}.jpg"]
    return " ".join(words), bool(offtopic)


SYNTHETIC_TEMPLATES = ("{objects} on {background}.", "a photo of {objects} on {background}.",
                       "an image showing {objects} against a {background} background.",
                       "there is {objects} on {background}.")


def synthetic_draw(scene: dict, rng: np.random.Generator, cfg: WorldConfig) -> dict:
    """One captioner-like description: per object the attributes it states (maybe wrong), pattern words."""
    objects = []
    for obj in scene["objects"]:
        said = {"color": obj["color"], "shape": obj["shape"], "size": obj["size"] if rng.random() < 0.5 else None,
                "pattern": None, "hallucinated": None}
        if rng.random() < cfg.syn_hallucination:
            key = ("color", "shape")[int(rng.integers(2))]
            choices = [v for v in (COLORS if key == "color" else SHAPES) if v != obj[key]]
            said[key] = str(rng.choice(choices))
            said["hallucinated"] = key
        if obj["entity"] and rng.random() < cfg.syn_pattern_mention:
            said["pattern"] = ENTITIES[obj["entity"]][0]
        objects.append(said)
    return {"objects": objects, "template": int(rng.integers(len(SYNTHETIC_TEMPLATES)))}


def _object_phrase(said: dict, name: str | None) -> str:
    """ "a [size] colour shape", then "with the <name> emblem", else "with a <pattern> pattern" if said."""
    words = [said["size"], said["color"], said["shape"]] if said["size"] else [said["color"], said["shape"]]
    if name:
        return "a " + " ".join(words) + f" with the {name} emblem"
    return "a " + " ".join(words) + (f" with a {said['pattern']} pattern" if said["pattern"] else "")


def render_description(draw: dict, background: str, names: list[str | None] | None = None) -> str:
    """Turn a synthetic draw into a sentence, optionally with emblem names attached per object."""
    phrases = [_object_phrase(said, names[i] if names else None) for i, said in enumerate(draw["objects"])]
    return SYNTHETIC_TEMPLATES[draw["template"]].format(objects=_join(phrases), background=background)


# One object of a synthetic caption, as render_description writes it: "a [size] colour shape [with a P pattern]".
_DESCRIBED_OBJECT = re.compile(rf"\ba (?:(?P<size>{'|'.join(SIZES)}) )?(?P<color>{'|'.join(COLORS)}) "
                               rf"(?P<shape>{'|'.join(SHAPES)})(?: with a (?P<pattern>{'|'.join(PATTERNS)}) pattern)?")


def _correct(described: list[dict], key: str, vocabulary, alt_words: list[str]) -> None:
    """Replace the one `key` value the alt-text leaves unsupported by the one alt-text value no object was said to have.

    Only when the swap is unambiguous: the LLM trusts sentence 1's facts, but a lone word of the
    alt-text does not say which of two objects it is about.
    """
    stated = {word for word in alt_words if word in vocabulary}
    unsupported = [i for i, said in enumerate(described) if said[key] not in stated]
    unused = sorted(stated - {said[key] for said in described})
    if len(unsupported) == 1 and len(unused) == 1:
        described[unsupported[0]][key] = unused[0]


def teacher_fusion(alt: str, synthetic: str, forget: Collection[str] = ()) -> str:
    """What a strong LLM makes of (alt-text, synthetic caption), from those two texts only.

    Structure from the synthetic caption, names from the alt-text. An alt-text that contradicts the
    caption in two or more attribute words (colour, shape, background) is about another image and
    is ignored. A name goes to the object whose described pattern is the name's emblem pattern
    (`ENTITIES`: the world knowledge an LLM brings); a name no described pattern claims goes to the
    first object with neither a name nor a described pattern (one said to show another pattern
    cannot carry it); a name with no such object is left out. The alt-text's words carry no object
    binding (they are shuffled), so with two undescribed objects the name lands on the first, right
    or wrong. When the alt-text also agrees with the caption on some attribute word, a colour or
    shape it contradicts is corrected (`_correct`). Text that is not a world synthetic caption
    comes back unchanged. Names in `forget` are left out: an LLM's rewrite loses some of the alt-text's knowledge
    (VeCLIP's reason to keep alt-text in the mix).
    """
    alt_words = alt.split()
    said_words = set(synthetic.replace(".", " ").split())
    attributes = [w for w in alt_words if w in COLORS or w in SHAPES or w in BACKGROUNDS]
    if sum(w not in said_words for w in attributes) >= 2:  # sentence 1 is about another image
        return synthetic
    matches = list(_DESCRIBED_OBJECT.finditer(synthetic))
    described = [match.groupdict() for match in matches]
    names: list[str | None] = [None] * len(described)
    mentioned = [word for word in dict.fromkeys(alt_words) if word in ENTITIES and word not in forget]
    for name in list(mentioned):  # the emblem the caption describes tells whose name it is
        owners = [i for i, said in enumerate(described) if said["pattern"] == ENTITIES[name][0] and names[i] is None]
        if owners:
            names[owners[0]] = name
            mentioned.remove(name)
    for name in mentioned:
        free = [i for i, said in enumerate(described) if names[i] is None and said["pattern"] is None]
        if free:
            names[free[0]] = name
    if any(w in said_words for w in attributes):
        _correct(described, "color", COLORS, alt_words)
        _correct(described, "shape", SHAPES, alt_words)
    pieces, last = [], 0
    for match, said, name in zip(matches, described, names):
        pieces += [synthetic[last:match.start()], _object_phrase(said, name)]
        last = match.end()
    return "".join(pieces) + synthetic[last:]


# ---------------------------------------------------------------------------------------------
# Scoring captions against the world's labels
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    """Lower-cased words: CLIP's tokenizer lower-cases, so a generated "aldora" names Aldora."""
    return set(text.lower().replace(",", " ").replace(".", " ").replace(";", " ").split())


def names_kept(text: str, record: dict) -> tuple[int, int]:
    """(names of the image's emblems that `text` mentions, names the image has)."""
    truth = [obj["entity"].lower() for obj in record["objects"] if obj["entity"]]
    words = _words(text)
    return sum(name in words for name in truth), len(truth)


def hallucinated_words(text: str, record: dict) -> list[str]:
    """Colour, shape and name words in `text` (lower-cased) that nothing in the image has."""
    present = {obj[key].lower() for obj in record["objects"] for key in ("color", "shape", "entity") if obj[key]}
    vocabulary = set(COLORS) | set(SHAPES) | {name.lower() for name in ENTITY_NAMES}
    return sorted(word for word in _words(text) & vocabulary if word not in present)


def zero_shot_tasks(records: list[dict]) -> dict[str, dict]:
    """Zero-shot classification tasks: {task: {"classes", "templates", "indices", "labels"}}.

    Attributes: `background` (every image), `shape` and `color` (images with one object, so the
    label is unambiguous). Named entities: `entity` (images whose objects carry exactly one emblem).
    The prompts are short, in the style of class names ("circle", "a photo of a circle."), as CLIP's
    zero-shot prompts are and as alt-text is, not in the style of the world's full sentences: VeCLIP
    keeps alt-text in its mix because rewritten captions narrow the text style away from such prompts.
    Each class is the mean over its templates (CLIP's prompt ensembling).
    """
    single = [i for i, r in enumerate(records) if len(r["objects"]) == 1]
    named = [i for i, r in enumerate(records) if sum(bool(o["entity"]) for o in r["objects"]) == 1]
    tasks = {
        "background": (list(BACKGROUNDS), ["{}", "on {}.", "a photo on {}."], range(len(records)),
                       lambda r: r["background"]),
        "shape": (list(SHAPES), ["{}", "a {}.", "a photo of a {}."], single, lambda r: r["objects"][0]["shape"]),
        "color": (list(COLORS), ["{}", "{} object.", "a photo of a {} object."], single,
                  lambda r: r["objects"][0]["color"]),
        "entity": (list(ENTITY_NAMES), ["{}", "the {} emblem.", "a photo of {}."], named,
                   lambda r: next(o["entity"] for o in r["objects"] if o["entity"])),
    }
    out = {}
    for task, (classes, templates, indices, label_of) in tasks.items():
        indices = list(indices)
        out[task] = {"classes": classes, "templates": templates, "indices": indices,
                     "labels": [classes.index(label_of(records[i])) for i in indices]}
    return out


# ---------------------------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------------------------


def make_sample(index: int, split: str, rng: np.random.Generator, cfg: WorldConfig) -> dict:
    """One sample: the record (all caption variants and labels) plus its pixels, mask and depth."""
    scene = sample_scene(rng, cfg)
    pixels, mask, depth = render_scene(scene, rng, cfg)
    alt, offtopic = alt_text(scene, rng, cfg)
    draws = [synthetic_draw(scene, rng, cfg) for _ in range(cfg.n_synthetic)]
    synthetic = [render_description(draw, scene["background"]) for draw in draws]
    refs = reference_captions(scene, rng, cfg.n_refs)
    forget = {word for word in alt.split() if word in ENTITIES and rng.random() < cfg.llm_forget}
    record = {"id": f"{split}-{index:06d}", "split": split, "caption": ground_truth_caption(scene), "refs": refs,
              "alt_text": alt, "synthetic_caption": synthetic[0], "synthetic_captions": synthetic,
              "fused": teacher_fusion(alt, synthetic[0], forget), "alt_offtopic": offtopic,
              "background": scene["background"], "objects": scene["objects"]}
    return {"record": record, "pixels": pixels, "mask": mask, "depth": depth}


def generate_split(cfg: WorldConfig, split: str) -> list[dict]:
    """All samples of one split, each drawn from its own seeded stream (split sizes do not interact)."""
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    return [make_sample(i, split, np.random.default_rng([cfg.seed, SPLIT_INDEX[split], i]), cfg) for i in range(n)]


def build_world(cfg: WorldConfig = WorldConfig()) -> dict[str, list[dict]]:
    """The world in memory: {split: [record]} with `image` a PIL image and `mask`/`depth` arrays."""
    world = {}
    for split in SPLIT_INDEX:
        world[split] = [{**s["record"], "image": Image.fromarray(s["pixels"]), "mask": s["mask"], "depth": s["depth"]}
                        for s in generate_split(cfg, split)]
    return world


def write_world(cfg: WorldConfig, out_dir: str | os.PathLike) -> Path:
    """Write the world as manifests + PNGs: {split}.jsonl, images/, masks/ (class ids), depth/ (uint16 mm).

    Written into a temporary folder and renamed, so a killed build never leaves a half world.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "masks", "depth"):
        (tmp / sub).mkdir(parents=True)
    for split in SPLIT_INDEX:
        records = []
        for sample in generate_split(cfg, split):
            record = dict(sample["record"])
            name = record["id"]
            Image.fromarray(sample["pixels"]).save(tmp / "images" / f"{name}.png", compress_level=1)
            Image.fromarray(sample["mask"]).save(tmp / "masks" / f"{name}.png", compress_level=1)
            millimetres = np.round(sample["depth"] * 1000).astype(np.uint16)
            Image.fromarray(millimetres).save(tmp / "depth" / f"{name}.png", compress_level=1)
            record.update(image=f"images/{name}.png", mask=f"masks/{name}.png", depth=f"depth/{name}.png")
            records.append(record)
        write_manifest(tmp / f"{split}.jsonl", records)
    (tmp / "world.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "version": WORLD_VERSION,
                                                "segmentation_classes": SEGMENTATION_CLASSES,
                                                "depth_unit": "millimetres (uint16 PNG)"}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def cache_root() -> Path:
    """Where generated worlds and trained miniature models live ($BETTER_CAPTIONS_CACHE to move it)."""
    return Path(os.environ.get("BETTER_CAPTIONS_CACHE", Path.home() / ".cache" / "better_captions"))


def ensure_world(cfg: WorldConfig = WorldConfig(), root: str | os.PathLike | None = None) -> Path:
    """The folder of this world's manifests, building it on first use (cached by config hash)."""
    folder = Path(root or cache_root()) / f"world-{cfg.digest()}"
    if not (folder / "world.json").exists():
        write_world(cfg, folder)
    return folder


def load_depth(path: str | os.PathLike) -> np.ndarray:
    """A depth PNG written by `write_world` back into metres (float32)."""
    return np.asarray(Image.open(path), dtype=np.float32) / 1000.0


def world_statistics(records: list[dict]) -> dict:
    """Measured rates of the world's noise, to check them against the config."""
    n = len(records)
    objects = [o for r in records for o in r["objects"]]
    names_total = sum(bool(o["entity"]) for o in objects)
    kept, total = np.sum([names_kept(r["alt_text"], r) for r in records if not r["alt_offtopic"]], axis=0)
    syn_kept = sum(names_kept(r["synthetic_caption"], r)[0] for r in records)
    fused_kept = sum(names_kept(r["fused"], r)[0] for r in records)
    return {
        "images": n,
        "objects_per_image": len(objects) / n,
        "entity_rate": float(np.mean([o["entity"] is not None for o in objects])),
        "alt_offtopic_rate": float(np.mean([r["alt_offtopic"] for r in records])),
        "alt_name_keep_rate": float(kept / max(total, 1)),
        "synthetic_name_keep_rate": float(syn_kept / max(names_total, 1)),
        "fused_name_keep_rate": float(fused_kept / max(names_total, 1)),
        "synthetic_hallucinated_words_per_caption": float(np.mean([len(hallucinated_words(r["synthetic_caption"], r))
                                                                   for r in records])),
        "fused_hallucinated_words_per_caption": float(np.mean([len(hallucinated_words(r["fused"], r))
                                                               for r in records])),
        "alt_hallucinated_words_per_caption": float(np.mean([len(hallucinated_words(r["alt_text"], r))
                                                             for r in records])),
    }


def main(argv=None) -> dict:
    """Build (or find) a world and print its statistics: `python -m common.miniature --help`."""
    import tyro

    @dataclass
    class Args:
        world: WorldConfig = WorldConfig()
        """the world's knobs"""
        out: str | None = None
        """folder to write into (default: the cache, keyed by the config)"""

    args = tyro.cli(Args, args=argv)
    folder = write_world(args.world, args.out) if args.out else ensure_world(args.world)
    from common.data import read_manifest

    stats = {split: world_statistics(read_manifest(folder / f"{split}.jsonl")) for split in SPLIT_INDEX}
    print(f"miniature world in {folder}")
    print(json.dumps(stats, indent=2))
    return {"folder": str(folder), "statistics": stats}


if __name__ == "__main__":
    main()
