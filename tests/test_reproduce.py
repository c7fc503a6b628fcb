"""reproduce.py: the main job runs end to end on a tiny world and writes its table."""

import json

from reproduce import VARIANTS, main


def test_main_job_on_a_tiny_world(tmp_path):
    argv = ["--seeds", "2", "--world.n-train", "48", "--world.n-val", "4", "--world.n-test", "16",
            "--scorer.steps", "3", "--scorer.batch-size", "16", "--scorer.warmup", "1",
            "--scorer-model", "micro-ViT-16", "--out", str(tmp_path)]
    report = main(argv)
    assert [run["seed"] for run in report["runs"]] == [0, 1]
    saved = json.loads((tmp_path / "world.json").read_text())
    for run in saved["runs"]:
        assert set(run["variants"]) == set(VARIANTS)
        assert run["variants"]["caption"]["names_kept_%"] == 100.0
        assert run["variants"]["synthetic_caption"]["names_kept_%"] == 0.0
        assert run["variants"]["caption"]["hallucinated_words"] == 0.0
        assert 0 <= run["variants"]["alt_text"]["CLIP-S"] <= 2.5
    table = (tmp_path / "world.md").read_text()
    assert "| `fused` |" in table and "±" in table
