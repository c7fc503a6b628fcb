"""common/miniature.py: determinism, the configured noise rates, labels, masks and depth, the teacher."""

import dataclasses
import hashlib

import numpy as np
import pytest
from PIL import Image

from common.data import read_manifest
from common.miniature import (COLORS, ENTITIES, ENTITY_NAMES, SEGMENTATION_CLASSES, SHAPES, SWAP_TYPES, WorldConfig,
                              build_world, generate_split, ground_truth_caption, hallucinated_words, load_depth,
                              names_kept, swapped_captions, teacher_fusion, world_statistics, write_world,
                              zero_shot_tasks)

SMALL = WorldConfig(n_train=30, n_val=5, n_test=10)


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = folder_digest(write_world(SMALL, tmp_path / "a"))
    assert first == folder_digest(write_world(SMALL, tmp_path / "b"))
    assert first != folder_digest(write_world(dataclasses.replace(SMALL, seed=1), tmp_path / "c"))
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary build folder was renamed away


def test_written_world_is_readable_with_masks_and_depth(tmp_path):
    folder = write_world(SMALL, tmp_path / "w")
    records = read_manifest(folder / "train.jsonl")
    assert len(records) == 30 and len(read_manifest(folder / "test.jsonl")) == 10
    record = records[0]
    image = Image.open(folder / record["image"])
    mask = np.asarray(Image.open(folder / record["mask"]))
    depth = load_depth(folder / record["depth"])
    assert image.size == (64, 64) and image.mode == "RGB" and mask.shape == depth.shape == (64, 64)
    shapes_present = {SEGMENTATION_CLASSES[k] for k in np.unique(mask)} - {"background"}
    assert shapes_present <= {obj["shape"] for obj in record["objects"]} and shapes_present
    assert depth.min() >= 2.0 - 1e-3 and depth.max() <= 10.0 + 1e-3
    assert np.all(depth[mask > 0] < 6.0)  # objects stand in front of the ground plane behind them
    for field in ("caption", "alt_text", "synthetic_caption", "fused"):
        assert isinstance(record[field], str) and record[field].strip()
    assert len(record["synthetic_captions"]) == 5 and record["synthetic_captions"][0] == record["synthetic_caption"]


def test_in_memory_world_matches_the_written_one(tmp_path):
    world = build_world(SMALL)
    folder = write_world(SMALL, tmp_path / "w")
    on_disk = read_manifest(folder / "val.jsonl")
    assert [r["caption"] for r in world["val"]] == [r["caption"] for r in on_disk]
    assert np.array_equal(np.asarray(world["val"][0]["image"]), np.asarray(Image.open(folder / on_disk[0]["image"])))


def test_noise_rates_match_the_config():
    records = [s["record"] for s in generate_split(WorldConfig(n_train=3000), "train")]
    stats = world_statistics(records)
    assert abs(stats["objects_per_image"] - 1.5) < 0.04
    assert abs(stats["entity_rate"] - 0.5) < 0.03
    assert abs(stats["alt_offtopic_rate"] - 0.15) < 0.02
    assert abs(stats["alt_name_keep_rate"] - 0.9) < 0.02
    assert stats["synthetic_name_keep_rate"] == 0.0
    # a hallucination replaces one colour or shape per object at rate 0.2; it is invisible only
    # when the wrong word happens to name the other object's attribute
    assert 0.2 * 1.5 * 0.85 < stats["synthetic_hallucinated_words_per_caption"] < 0.2 * 1.5 * 1.01
    assert 0.7 * 0.75 < stats["fused_name_keep_rate"] < 0.75 and stats["fused_hallucinated_words_per_caption"] < stats[
        "synthetic_hallucinated_words_per_caption"]


def test_knobs_switch_mechanisms_off():
    clean = WorldConfig(n_train=400, alt_offtopic=0.0, alt_name_keep=1.0, syn_hallucination=0.0, alt_spam=0.0,
                        llm_forget=0.0)
    records = [s["record"] for s in generate_split(clean, "train")]
    stats = world_statistics(records)
    assert stats["alt_offtopic_rate"] == 0 and stats["alt_name_keep_rate"] == 1.0
    assert stats["synthetic_hallucinated_words_per_caption"] == 0 and stats["fused_name_keep_rate"] == 1.0
    assert not any("IMG_" in r["alt_text"] and not r["alt_text"].endswith(".jpg") for r in records)
    with pytest.raises(ValueError, match="alt_offtopic must be a probability"):
        WorldConfig(alt_offtopic=1.5)


def test_emblems_stay_visible():
    for sample in generate_split(WorldConfig(n_train=300, entity_rate=1.0), "train"):
        for obj in (o for o in sample["record"]["objects"] if o["entity"]):
            ink = ENTITIES[obj["entity"]][1]
            assert (ink, obj["color"]) not in {("light", "white"), ("dark", "black")}


SCENE = {"background": "grass", "objects": [
    {"shape": "circle", "color": "red", "size": "large", "entity": "Aldora", "position": "left"},
    {"shape": "square", "color": "blue", "size": "small", "entity": None, "position": "right"}]}


def test_teacher_fusion_by_hand():
    # Aldora's emblem is stripes (ENTITIES), Kestrel's rings: the described pattern tells whose name it is
    assert teacher_fusion("Aldora grass stock photo",
                          "a red circle with a stripes pattern and a small blue square on grass.") == \
        "a red circle with the Aldora emblem and a small blue square on grass."
    assert teacher_fusion("Aldora",
                          "a photo of a red circle and a small blue square with a stripes pattern on grass.") == \
        "a photo of a red circle and a small blue square with the Aldora emblem on grass."
    # no described pattern: the first object without one takes the name (right or wrong: the texts cannot tell)
    assert teacher_fusion("Kestrel jpg", "a red circle and a small blue square on grass.") == \
        "a red circle with the Kestrel emblem and a small blue square on grass."
    assert teacher_fusion("Kestrel Aldora",
                          "a red circle with a stripes pattern and a small blue square on grass.") == \
        "a red circle with the Aldora emblem and a small blue square with the Kestrel emblem on grass."
    # a name whose emblem contradicts every described pattern is left out
    assert teacher_fusion("Kestrel", "a red circle with a stripes pattern on grass.") == \
        "a red circle with a stripes pattern on grass."
    # two contradicted attribute words: the alt-text is about another image, nothing of it is taken
    assert teacher_fusion("Aldora snow triangle", "a red circle on grass.") == "a red circle on grass."
    # a contradicted colour is corrected when the alt-text is otherwise about the image and the swap is unambiguous
    assert teacher_fusion("red circle", "a green circle on grass.") == "a red circle on grass."
    assert teacher_fusion("red", "a green circle on grass.") == "a green circle on grass."  # nothing agrees
    assert teacher_fusion("red grass", "a green circle and a blue square on grass.") == \
        "a green circle and a blue square on grass."  # which of the two is red?
    assert teacher_fusion("red blue grass", "a green circle and a blue square on grass.") == \
        "a red circle and a blue square on grass."


def test_teacher_fusion_is_a_function_of_the_two_texts():
    records = [s["record"] for s in generate_split(WorldConfig(n_train=300, llm_forget=0.0), "train")]
    # the world's `fused` is what the teacher makes of the two texts, whatever the hidden labels are
    assert all(r["fused"] == teacher_fusion(r["alt_text"], r["synthetic_caption"]) for r in records)
    # its parse of a synthetic caption is exact: with nothing to add, the caption comes back
    assert all(teacher_fusion("", caption) == caption for r in records for caption in r["synthetic_captions"])
    # so it errs where the texts cannot tell: a name that belongs to the right-hand object lands on the left one
    misplaced = [r for r in records
                 if len(r["objects"]) == 2 and r["objects"][1]["entity"] and not r["objects"][0]["entity"]
                 and f"the {r['objects'][1]['entity']} emblem" in r["fused"].split(" and ")[0]]
    assert len(misplaced) >= 5


def test_caption_scoring_by_hand():
    record = dict(SCENE)
    assert names_kept("the Aldora emblem, on grass.", record) == (1, 1)
    assert names_kept("a red circle", record) == (0, 1)
    assert names_kept("a red circle with the aldora emblem", record) == (1, 1)  # CLIP's tokenizer lower-cases
    assert hallucinated_words("a green circle with the Kestrel emblem and a blue star.", record) == ["green", "kestrel"]
    assert hallucinated_words("a red circle and a blue square.", record) == []


def test_zero_shot_tasks_label_what_is_there():
    records = [s["record"] for s in generate_split(WorldConfig(n_train=200), "train")]
    tasks = zero_shot_tasks(records)
    assert set(tasks) == {"background", "shape", "color", "entity"}
    assert len(tasks["background"]["indices"]) == 200
    for i, label in zip(tasks["shape"]["indices"], tasks["shape"]["labels"]):
        assert len(records[i]["objects"]) == 1 and SHAPES[label] == records[i]["objects"][0]["shape"]
    for i, label in zip(tasks["color"]["indices"], tasks["color"]["labels"]):
        assert list(COLORS)[label] == records[i]["objects"][0]["color"]
    for i, label in zip(tasks["entity"]["indices"], tasks["entity"]["labels"]):
        assert tasks["entity"]["classes"][label] in {o["entity"] for o in records[i]["objects"]}


def test_the_llm_forgets_names_at_its_rate():
    remembered = world_statistics([s["record"]
                                   for s in generate_split(WorldConfig(n_train=2000, llm_forget=0.0), "train")])
    records = [s["record"] for s in generate_split(WorldConfig(n_train=2000), "train")]
    forgetful = world_statistics(records)
    # a quarter of the names the fusion would carry are lost; nothing else of the fusion changes
    assert forgetful["fused_name_keep_rate"] == pytest.approx(0.75 * remembered["fused_name_keep_rate"], abs=0.03)
    for r in records:
        forgotten = {w for w in r["alt_text"].split() if w in ENTITIES and w not in r["fused"]}
        assert r["fused"] == teacher_fusion(r["alt_text"], r["synthetic_caption"], forgotten)
    assert teacher_fusion("Aldora", "a red circle with a stripes pattern on grass.", {"Aldora"}) == \
        "a red circle with a stripes pattern on grass."


def test_references_vary_in_specificity_as_cocos_do():
    records = [s["record"] for s in generate_split(WorldConfig(n_train=500), "train")]
    assert all(len(r["refs"]) == 5 for r in records)
    refs = [(ref, r) for r in records for ref in r["refs"]]
    # every reference names each shape (the head noun), and says nothing the image does not have
    assert all(all(o["shape"] in ref for o in r["objects"]) and not hallucinated_words(ref, r) for ref, r in refs)
    words = np.array([len(ref.split()) for ref, _ in refs])
    generic = np.mean([not any(c in ref for c in COLORS) for ref, _ in refs])
    complete = np.mean([ref == r["caption"] for ref, r in refs])
    assert 0.15 < generic < 0.5 and 0.02 < complete < 0.2 and words.std() > 3
    named = [(ref, r) for ref, r in refs if any(o["entity"] for o in r["objects"])]
    assert 0.35 < np.mean([names_kept(ref, r)[0] / names_kept(ref, r)[1] for ref, r in named]) < 0.65


def test_swapped_captions_change_one_thing():
    caption = ground_truth_caption(SCENE)
    assert caption == \
        "a large red circle with the Aldora emblem on the left and a small blue square on the right, on grass."
    swaps = swapped_captions(dict(SCENE), np.random.default_rng(0))
    assert set(swaps) == set(SWAP_TYPES)
    assert swaps["binding"] == \
        "a large blue circle with the Aldora emblem on the left and a small red square on the right, on grass."
    assert swaps["position"] == \
        "a large red circle with the Aldora emblem on the right and a small blue square on the left, on grass."
    for kind in ("position", "binding"):  # the same words, bound differently: a bag of words cannot tell
        assert sorted(swaps[kind].replace(",", "").split()) == sorted(caption.replace(",", "").split())
    for kind in ("color", "shape", "size", "background", "name"):
        changed = [(a, b) for a, b in zip(caption.split(), swaps[kind].split()) if a != b]
        assert len(changed) == 1 and len(swaps[kind].split()) == len(caption.split()), kind
        assert changed[0][1].strip(".,") in {"color": COLORS, "shape": SHAPES, "size": ("small", "large"),
                                             "background": ("sand", "water", "snow", "night"),
                                             "name": ENTITY_NAMES}[kind]
    alone = {"background": "sand", "objects": [dict(SCENE["objects"][1], position="center")]}
    assert set(swapped_captions(alone, np.random.default_rng(0))) == \
        {"color", "shape", "size", "position", "background"}
