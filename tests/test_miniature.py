"""common/miniature.py: determinism, the configured noise rates, labels, masks and depth, the teacher."""

import dataclasses
import hashlib

import numpy as np
import pytest
from PIL import Image

from common.data import read_manifest
from common.miniature import (COLORS, ENTITIES, SEGMENTATION_CLASSES, SHAPES, WorldConfig, build_world,
                              generate_split, hallucinated_words, load_depth, names_kept, teacher_fusion,
                              world_statistics, write_world, zero_shot_tasks)

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
    assert stats["fused_name_keep_rate"] > 0.7 and stats["fused_hallucinated_words_per_caption"] < stats[
        "synthetic_hallucinated_words_per_caption"]


def test_knobs_switch_mechanisms_off():
    clean = WorldConfig(n_train=400, alt_offtopic=0.0, alt_name_keep=1.0, syn_hallucination=0.0, alt_spam=0.0)
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


def synthetic(color0="red", hallucinated=None):
    return {"template": 0, "objects": [
        {"color": color0, "shape": "circle", "size": None, "pattern": "stripes", "hallucinated": hallucinated},
        {"color": "blue", "shape": "square", "size": "small", "pattern": None, "hallucinated": None}]}


def test_teacher_fusion_by_hand():
    assert teacher_fusion(SCENE, "Aldora grass stock photo", synthetic()) == \
        "a red circle with the Aldora emblem and a small blue square on grass."
    # a name the image does not have (off-topic alt-text) attaches to the first object without one
    assert teacher_fusion(SCENE, "Kestrel jpg", synthetic()) == \
        "a red circle with the Kestrel emblem and a small blue square on grass."
    assert teacher_fusion(SCENE, "Kestrel Aldora", synthetic()) == \
        "a red circle with the Aldora emblem and a small blue square with the Kestrel emblem on grass."
    # the hallucinated colour is corrected only when the alt-text states the true one
    assert teacher_fusion(SCENE, "red circle", synthetic("green", "color")).startswith("a red circle with a stripes")
    assert teacher_fusion(SCENE, "circle", synthetic("green", "color")).startswith("a green circle")


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
