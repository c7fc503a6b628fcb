"""reproduce.py: verdicts on hand-made numbers, and the main job end to end on a tiny world."""

import json

import numpy as np
import pytest

import reproduce
from common.claims import verdict
from common.clip_train import TrainConfig, ensure_miniature_scorer
from common.miniature import WorldConfig

TINY_WORLD = ["--world.n-train", "48", "--world.n-val", "6", "--world.n-test", "16"]
SCORER = ["--scorer.steps", "3", "--scorer.batch-size", "16", "--scorer.warmup", "1", "--scorer-model", "micro-ViT-16"]


def test_verdicts_against_the_seed_spread():
    assert verdict([3.0, 5.0], [1.0, 1.0], ">") == "held"  # difference 3 > spread 1
    assert verdict([2.0, 4.0], [1.0, 3.0], ">") == "within seed spread"  # 1 < 1 + 1
    assert verdict([1.0, 1.0], [3.0, 5.0], ">") == "reversed"
    assert verdict([0.5], [0.7], "<") == verdict([0.9], [1.0], ">=") == "1 seed: no verdict"
    assert verdict([0.5, 0.5], [0.7, 0.9], "<") == "held" and verdict([0.5], [0.7, 0.9], "<") == "1 seed: no verdict"
    assert verdict([9.0, 11.0], [10.5, 11.5], ">=") == "held"  # -1 >= -(1 + 0.5)


def test_world_arguments_and_paper_arguments():
    assert reproduce.world_arguments(WorldConfig(seed=4, n_test=16, alt_spam=0.0)) == [
        "--world.n-test", "16", "--world.alt-spam", "0.0"]
    assert reproduce.extra_arguments(("dico=--steps 3", "dico=--xe-steps 2", "veclip=")) == {
        "dico": ["--steps", "3", "--xe-steps", "2"], "veclip": []}
    with pytest.raises(ValueError, match="NAME=ARGS"):
        reproduce.extra_arguments(("nonsense=--x 1",))


def test_world_table_alone(tmp_path):
    report = reproduce.main(["--seeds", "2", *TINY_WORLD, *SCORER, "--papers", "--out", str(tmp_path)])
    assert [run["seed"] for run in report["world"]["runs"]] == [0, 1] and report["papers"] == {}
    assert "train the miniature scorer" in (tmp_path / "logs" / "world-seed1.txt").read_text()  # ran as a stage
    in_process = reproduce.main(["--seeds", "2", *TINY_WORLD, *SCORER, "--papers", "--jobs", "1",
                                 "--out", str(tmp_path / "in_process")])
    for alone, side_by_side in zip(in_process["world"]["runs"], report["world"]["runs"]):
        assert alone["scorer"] == side_by_side["scorer"]
        for field, scores in alone["variants"].items():
            assert scores == pytest.approx(side_by_side["variants"][field], rel=1e-5), field
    with pytest.raises(SystemExit, match="--jobs 0"):
        reproduce.main(["--jobs", "0", "--papers", "--out", str(tmp_path)])
    for run in json.loads((tmp_path / "world.json").read_text())["runs"]:
        assert set(run["variants"]) == set(reproduce.VARIANTS)
        assert run["variants"]["caption"]["names_kept_%"] == 100.0
        assert run["variants"]["synthetic_caption"]["names_kept_%"] == 0.0
        assert run["variants"]["caption"]["hallucinated_words"] == 0.0
        assert 0 <= run["variants"]["alt_text"]["CLIP-S"] <= 2.5
    table = (tmp_path / "world.md").read_text()
    assert "| `fused` |" in table
    for kind in ("color", "shape", "size", "position", "background"):  # the swap test, one row per type
        swapped = [run["scorer"][f"swap_{kind}"] for run in report["world"]["runs"]]
        assert f"| {kind} |" in table and all(value in {100.0 * k / 16 for k in range(17)} for value in swapped)


@pytest.mark.slow
def test_main_job_runs_every_paper_on_a_tiny_world(tmp_path):
    world = WorldConfig(n_train=48, n_val=6, n_test=16)
    scorer = str(ensure_miniature_scorer(world, TrainConfig(steps=3, batch_size=16, warmup=1), "micro-ViT-16"))
    dico_models = " ".join(f"--{role}-model micro-ViT-16 --{role}-pretrained {scorer}"
                           for role in ("encoder", "clip-s", "pacs"))
    paper_args = [
        "veclip=--model micro-ViT-16 --steps 2 --batch-size 16 --kernel torch",
        "clip_quality=--model micro-ViT-16 --train.steps 2 --train.batch-size 16 --train.warmup 1 --probe-steps 2 "
        "--probe-batch-size 8 --probe-train-images 16 --attention-images 4 --subset-fractions 0.5 1.0",
        f"dico={dico_models} --d-model 32 --heads 2 --ffn 64 --encoder-layers 1 --decoder-layers 1 --max-len 12 "
        "--eval-beam 2 --val-images 6 --eval-images 6 --eval-every 2 --save-every 2 --xe-steps 4 --xe-batch-size 8 "
        "--steps 2 --batch-size 4 --beams 3",
        "capsfusion=--sizes 16 48 --clip-model micro-ViT-16 --clip-batch-size 16 --max-new-tokens 8",
        f"altogether=--clip-model micro-ViT-16 --clip-pretrained {scorer} --score-model micro-ViT-16 "
        f"--score-pretrained {scorer} --pretrain-steps 2 --finetune-steps 2 --batch-size 8 --max-new-tokens 5",
    ]
    report = reproduce.main(["--seeds", "1", *TINY_WORLD, *SCORER, "--out", str(tmp_path), "--paper-args", *paper_args])
    assert set(report["papers"]) == set(reproduce.PAPERS)
    one_seed = {"held on this seed", "reversed on this seed", "within test-set noise"}
    for paper, run in report["papers"].items():
        # one seed: each claim with per-item values is judged by the paired bootstrap; only rows without any
        # (clip_quality's attention and trivial baselines) or moot ones (a failed control) are left unjudged
        judged = [row for row in run["claims"] if "bootstrap" in row]
        assert all(row["verdict"] in one_seed or row["verdict"].startswith("untestable") for row in judged), paper
        assert len(judged) >= {"clip_quality": 4}.get(paper, len(run["claims"])), (paper, run["claims"])
        assert (tmp_path / paper / "results.md").exists()
    table = (tmp_path / "claims.md").read_text()
    assert all(table.count(f"| {paper} |") >= 4 for paper in reproduce.PAPERS) and "95% interval" in table
    assert (tmp_path / "clip_quality-attention.png").exists()


def test_reuse_judges_saved_results_without_running(tmp_path):
    metrics = lambda r1, attributes, entity: {"i2t_R@1": r1, "zeroshot_attributes": attributes,  # noqa: E731
                                              "zeroshot_entity": entity}
    conditions = {"AltText": metrics([1.0, 2.0], [40.0, 42.0], [8.0, 9.0]),
                  "VeC": metrics([9.0, 10.0], [50.0, 52.0], [8.0, 9.0]),
                  "LLM-VeC": metrics([18.0, 19.0], [55.0, 56.0], [10.0, 11.0]),
                  "AltText+LLM-VeC mix": metrics([4.0, 5.0], [51.0, 52.0], [9.0, 10.0])}
    (tmp_path / "veclip").mkdir()
    (tmp_path / "veclip" / "results.json").write_text(json.dumps({"conditions": conditions, "seconds": 60.0}))
    report = reproduce.main(["--seeds", "2", *TINY_WORLD, *SCORER, "--papers", "veclip", "--reuse",
                             "--out", str(tmp_path)])
    claims = report["papers"]["veclip"]["claims"]
    assert [row["verdict"] for row in claims] == ["held", "held", "reversed", "reversed", "within seed spread"]
    assert claims[0]["measured"] == "I->T R@1 %: LLM-VeC 18.5 ± 0.5 vs AltText 1.5 ± 0.5"
    assert "| veclip | The AltText/LLM-VeC mix keeps LLM-VeC's retrieval |" in (tmp_path / "claims.md").read_text()


def test_one_seed_rows_are_judged_by_a_paired_bootstrap_over_the_test_items(tmp_path):
    """--seeds 1 with per-item values: each row's verdict and 95% interval come from common.claims.paired_bootstrap
    (hand-made hits: 20 test images); a metric without per-item values keeps '1 seed: no verdict'."""
    hits = lambda *on: [100.0 if i in on else 0.0 for i in range(20)]  # noqa: E731
    every, none, half = hits(*range(20)), hits(), hits(*range(10))
    conditions = {name: {"i2t_R@1": [sum(h) / 20], "zeroshot_attributes": [50.0], "zeroshot_entity": [10.0]}
                  for name, h in (("AltText", none), ("VeC", half), ("LLM-VeC", half), ("AltText+LLM-VeC mix", none))}
    attributes = [[100.0, None, 0.0]] * 20  # per image [background, shape, color]: 50 for every arm
    per_item = {name: {"i2t_R@1": h, "zeroshot_attributes": attributes}
                for name, h in (("AltText", none), ("VeC", every), ("LLM-VeC", half), ("AltText+LLM-VeC mix", none))}
    per_item["VeC"]["i2t_R@1"] = half
    (tmp_path / "veclip").mkdir()
    (tmp_path / "veclip" / "results.json").write_text(json.dumps({"conditions": conditions, "per_item": per_item,
                                                                   "seconds": 60.0}))
    report = reproduce.main(["--seeds", "1", *TINY_WORLD, *SCORER, "--papers", "veclip", "--reuse", "--jobs", "1",
                             "--out", str(tmp_path)])
    claims = report["papers"]["veclip"]["claims"]
    assert [row["verdict"] for row in claims] == ["held on this seed", "within test-set noise",
                                                  "reversed on this seed", "within test-set noise",
                                                  "1 seed: no verdict"]
    assert claims[0]["bootstrap"]["difference"] == 50.0 and claims[0]["bootstrap"]["items"] == 20
    assert claims[1]["bootstrap"]["interval"] == [0.0, 0.0]  # the same hits under both arms: nothing to resample
    assert "95% interval" in claims[0]["why"] and "no per-item values" in claims[4]["why"]
    assert "paired bootstrap over the test items" in (tmp_path / "claims.md").read_text()


def test_the_bootstrap_statistics_equal_the_papers_metrics():
    """Resampled statistics that are not means reproduce the metric they stand for on the full set."""
    import torch

    from common import dense_probe

    rng = np.random.default_rng(0)
    masks, preds = rng.integers(0, 4, (5, 6, 6)), rng.integers(0, 4, (5, 6, 6))
    masks[0, 0, 0] = 255  # an ignored pixel
    confusions = [dense_probe.confusion_matrix(torch.as_tensor(p), torch.as_tensor(m), 4, 255)
                  for p, m in zip(preds, masks)]
    items = [[c.diag().tolist(), c.sum(0).tolist(), c.sum(1).tolist()] for c in confusions]
    expected = dense_probe.segmentation_metrics(sum(confusions))["mIoU"]
    assert reproduce.miou_of_sums(items) == pytest.approx(expected)
    assert reproduce.percent_of_sums([[1, 2], [0, 0], [3, 6]]) == pytest.approx(50.0)
    assert reproduce.mean_over_tasks([[100.0, None], [0.0, 100.0], [100.0, 0.0]]) == pytest.approx((200 / 3 + 50) / 2)
    assert reproduce.distinct_words(["A red bus.", "a RED car"]) == 4.0


def test_rows_scored_by_the_world_scorer_name_its_blind_spots():
    """The swap types the scorer ranks right on fewer than 80% of images (mean over seeds) are named on the rows
    whose metric is the scorer's own judgement, and only there."""
    runs = [{"scorer": {"swap_color": 97.0, "swap_shape": 52.0, "swap_position": 60.0}},
            {"scorer": {"swap_color": 95.0, "swap_shape": 54.0, "swap_position": 99.0}}]
    spots = reproduce.blind_spots(runs)
    assert spots == {"shape": 53.0, "position": 79.5}
    row = reproduce.claim_row("c", "CLIP-S x 100", "a", [1.0, 2.0], "b", [0.0, 0.0], ">")
    assert "; scorer blind spots (swap test < 80%: shape 53.0%, position 79.5%)" in \
        reproduce.blind_spot_note(row, spots)
    text_metric = reproduce.claim_row("c", "names kept %", "a", [1.0, 2.0], "b", [0.0, 0.0], ">")
    assert reproduce.blind_spot_note(text_metric, spots) == "" and reproduce.blind_spot_note(row, {}) == ""


def test_the_attention_row_is_judged_over_the_same_images():
    """clip_quality's last-layer attention distance, image by image under both models: a paired bootstrap."""
    def result(per_image: bool) -> dict:
        attention = {f"{regime}-n5000-seed0": {"per_layer_per_head_px": [[30.0, 30.0], [last, last]]}
                     | ({"per_image_last_layer_px": [last + d for d in (1.0, -1.0, 0.5, -0.5)]} if per_image else {})
                     for regime, last in (("datacomp", 33.0), ("datacompdr", 31.0))}
        return {"pretrain": [{"checkpoint": "a.pt", "regime": "datacomp", "i2t_R@1": 1.0},
                             {"checkpoint": "b.pt", "regime": "datacompdr", "i2t_R@1": 2.0}],
                "probe": [{"checkpoint": c, "mIoU": 20.0, "depth_RMSE": 1.0} for c in ("a.pt", "b.pt", "random")],
                "efficiency": [], "attention": attention}
    row = next(r for r in reproduce.clip_quality_claims(result(True)) if "attention" in r["metric"])
    assert row["verdict"] == "held on this seed"  # DataCompDR's 31 px against DataComp's 33, on every image
    assert row["bootstrap"]["difference"] == pytest.approx(2.0) and row["bootstrap"]["items"] == 4
    assert row["bootstrap"]["interval"] == pytest.approx([2.0, 2.0])  # the same offsets under both: no noise
    row = next(r for r in reproduce.clip_quality_claims(result(False)) if "attention" in r["metric"])
    assert row["verdict"] == "1 seed: no verdict"  # an older results.json: no per-image values


def test_the_one_seed_job_leaves_out_the_small_subset_unless_asked():
    one_seed, three_seeds = reproduce.Args(seeds=1, out="r"), reproduce.Args(seeds=3, out="r")
    assert reproduce.paper_argv("clip_quality", one_seed, []) == [
        "miniature", "--seeds", "1", "--out", "r/clip_quality", "--subset-fractions", "1.0"]
    assert reproduce.paper_argv("clip_quality", one_seed, ["--subset-fractions", "0.1", "1.0"])[-3:] == [
        "--subset-fractions", "0.1", "1.0"]  # the user's flag alone: it wins
    assert "--subset-fractions" not in reproduce.paper_argv("clip_quality", three_seeds, [])
    assert "--subset-fractions" not in reproduce.paper_argv("veclip", one_seed, [])
    probes = [{"checkpoint": c, "mIoU": m, "depth_RMSE": 1.0} for c, m in (("a.pt", 17.0), ("b.pt", 17.5),
                                                                           ("random", 19.0))]
    result = {"pretrain": [{"checkpoint": "a.pt", "regime": "datacomp", "i2t_R@1": 1.0},
                           {"checkpoint": "b.pt", "regime": "datacompdr", "i2t_R@1": 2.0}],
              "probe": probes, "efficiency": [{"regime": "datacompdr", "train_images": 5000, "mIoU": 17.5}],
              "attention": {}}
    rows = reproduce.clip_quality_claims(result)
    efficiency = next(row for row in rows if row["claim"].startswith("Data efficiency"))
    assert efficiency["verdict"] == "not run in this job" and "--subset-fractions 0.1 1.0" in efficiency["why"]
