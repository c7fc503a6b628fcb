"""common/stages.py: which stage starts next, and stages run in processes of their own with their logs."""

from pathlib import Path

import pytest

from common.stages import Stage, critical_minutes, last_line, next_stage, run_stages


def write(path: str, text: str) -> None:
    print(f"writing {path}")
    Path(path).write_text(text)


def copy_upper(source: str, target: str) -> None:
    Path(target).write_text(Path(source).read_text().upper())


def fail(message: str) -> None:
    raise RuntimeError(message)


def test_the_stage_with_the_longest_chain_behind_it_starts_first():
    world = Stage("world", write, minutes=1.5)
    altogether = Stage("altogether", write, minutes=3.0, after=("world",))
    dico = Stage("dico", write, minutes=0.9, after=("world",))
    clip_quality = Stage("clip_quality", write, minutes=3.8)
    waiting = [clip_quality, world, altogether, dico]
    assert critical_minutes(world, waiting) == 4.5  # 1.5 + the longer of 3.0 and 0.9
    assert next_stage(waiting, set()) is world  # 4.5 ahead of clip_quality's 3.8, though shorter itself
    assert next_stage([clip_quality, altogether, dico], {"world"}) is clip_quality
    assert next_stage([altogether, dico], set()) is None  # both wait for the world
    tie = [Stage("a", write, minutes=1.0), Stage("b", write, minutes=1.0)]
    assert next_stage(tie, set()).name == "a"


def test_stages_run_in_order_with_their_output_in_logs(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    stages = [Stage("second", copy_upper, (str(first), str(second)), after=("first",), minutes=5.0),
              Stage("first", write, (str(first), "made first"))]
    minutes = run_stages(stages, jobs=2, logs=tmp_path / "logs")
    assert second.read_text() == "MADE FIRST"  # "second" waited for "first", though it is longer
    assert set(minutes) == {"first", "second"}
    assert f"writing {first}" in (tmp_path / "logs" / "first.txt").read_text()


def test_a_failed_stage_is_named_with_its_log_and_what_never_started(tmp_path):
    kept = tmp_path / "kept.txt"
    stages = [Stage("broken", fail, ("the probe manifest has no mask field",), minutes=2.0),
              Stage("after_broken", write, (str(tmp_path / "never.txt"), "x"), after=("broken",)),
              Stage("alongside", write, (str(kept), "kept"), minutes=1.0)]
    with pytest.raises(SystemExit) as failure:
        run_stages(stages, jobs=2, logs=tmp_path / "logs")
    message = str(failure.value)
    assert "broken (exit code 1" in message and str(tmp_path / "logs" / "broken.txt") in message
    assert "RuntimeError: the probe manifest has no mask field" in message  # the log's last line
    assert "not started" in message and "after_broken" in message
    assert kept.read_text() == "kept" and not (tmp_path / "never.txt").exists()  # the running one finished


def test_stages_must_name_what_they_wait_for():
    with pytest.raises(ValueError, match="unknown"):
        run_stages([Stage("a", write, after=("nowhere",))], jobs=1, logs=Path("unused"))


def test_the_heartbeat_shows_a_logs_last_progress_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("started\nfinetune:  10%|#  | 1/10\rfinetune:  20%|##  | 2/10\nWARNING:root:no weights loaded\n")
    assert last_line(log) == "finetune:  20%|##  | 2/10"  # tqdm's last rewrite, not the library's warning
    log.write_text("WARNING:root:only warnings\n")
    assert last_line(log, width=12) == "WARNING:root"
    assert last_line(tmp_path / "absent.txt") == ""
