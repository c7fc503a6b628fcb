"""reproduce.py: verdicts on hand-made numbers, and the main job end to end on a tiny world."""

import json

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
    dico_models = " ".join(f"--{role}-model micro-ViT-16 --{role}-pretrained {scorer}" for role in ("encoder", "clip-s", "pacs"))
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
    for paper, run in report["papers"].items():
        verdicts = {row["verdict"].split(" (")[0] for row in run["claims"]}
        assert verdicts == {"1 seed: no verdict"}, paper  # one seed: no spread to judge against
        assert (tmp_path / paper / "results.md").exists()
    table = (tmp_path / "claims.md").read_text()
    assert all(table.count(f"| {paper} |") >= 4 for paper in reproduce.PAPERS) and "1 seed: no verdict" in table
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
