"""Stages of a long job run side by side: each in a process of its own, N at a time, each once the stages it needs are
done, the one with the longest chain of stages behind it first; each process writes its output to a log file, and
the terminal gets a line when a stage starts or ends and, every half minute, each running stage's last progress
line.

Why processes, on a CPU: the miniature runs are small matrix products, which one process spreads badly over two
threads. On 2 cores, two processes of one thread each got through 80 steps of the world's scorer in 30 s where one
process of two threads took 40 s, with the same metrics.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HEARTBEAT_SECONDS = 30.0


@dataclass(frozen=True)
class Stage:
    """One stage: `target(*arguments)` in a process of its own, once every stage named in `after` has succeeded."""

    name: str
    target: Callable
    arguments: tuple = ()
    after: tuple[str, ...] = ()
    minutes: float = 1.0
    """its expected length, to start first the ready stage with the longest chain behind it"""


def critical_minutes(stage: Stage, waiting: list[Stage]) -> float:
    """A stage's minutes plus those of the longest chain of waiting stages that need it: how long the job takes at
    least once it starts."""
    needing = [other for other in waiting if stage.name in other.after]
    return stage.minutes + max((critical_minutes(other, waiting) for other in needing), default=0.0)


def next_stage(waiting: list[Stage], done: set[str]) -> Stage | None:
    """The ready waiting stage (every `after` stage done) with the longest chain behind it, the first listed among
    equals; None if none is ready. So a stage others wait for starts before a longer one nothing waits for."""
    ready = [stage for stage in waiting if set(stage.after) <= done]
    return max(ready, key=lambda stage: critical_minutes(stage, waiting)) if ready else None


def _in_process(target: Callable, arguments: tuple, log: str, threads: int) -> None:
    """The child: its output (Python's and the libraries' own) into `log`, `threads` torch threads, then the stage."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch  # after the redirection, so that its warnings go to the log too

    torch.set_num_threads(threads)
    target(*arguments)


def last_line(log: Path, width: int = 90) -> str:
    """The last line of a log that is not a warning (tqdm rewrites its line with carriage returns; the last line of
    any kind when all are warnings), cut to `width` characters."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, os.path.getsize(log) - 4096))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.replace("\r", "\n").split("\n") if line.strip()]
    progress = [line for line in lines if not line.startswith("WARNING")] or lines  # a library's warning says less
    return progress[-1][:width] if progress else ""


def run_stages(stages: list[Stage], jobs: int, logs: Path) -> dict[str, float]:
    """Run every stage, `jobs` at a time, each with the cores over `jobs` as its torch threads; return
    each finished stage's minutes. A stage that fails starts nothing more; the running ones finish (their outputs are
    kept), then SystemExit names each failed stage, its exit code and log, and the tail of that log."""
    names = [stage.name for stage in stages]
    unknown = sorted({need for stage in stages for need in stage.after} - set(names))
    if len(set(names)) != len(names) or unknown:
        raise ValueError(f"stages must have distinct names and wait only for listed stages: {names}, unknown {unknown}")
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP pool or CUDA state forked
    waiting, running, done, failed, minutes = list(stages), {}, set(), [], {}
    began = heartbeat = time.time()

    def clock() -> str:
        return f"[{time.time() - began:4.0f} s]"

    while waiting or running:
        while len(running) < jobs and not failed and (stage := next_stage(waiting, done)) is not None:
            waiting.remove(stage)
            log = logs / f"{stage.name}.txt"
            process = context.Process(target=_in_process, args=(stage.target, stage.arguments, str(log), threads),
                                      name=stage.name)
            process.start()
            running[process.sentinel] = (stage, process, time.time(), log)
            print(f"{clock()} {stage.name}: started, {threads} thread(s), output in {log}", flush=True)
        if not running:
            break  # a stage failed, and what waits for it can never start
        finished = multiprocessing.connection.wait(list(running), timeout=HEARTBEAT_SECONDS)
        for sentinel in finished:
            stage, process, started, log = running.pop(sentinel)
            process.join()
            minutes[stage.name] = (time.time() - started) / 60
            if process.exitcode == 0:
                done.add(stage.name)
                print(f"{clock()} {stage.name}: done in {minutes[stage.name]:.1f} min", flush=True)
            else:
                failed.append(f"{stage.name} (exit code {process.exitcode}, output in {log}):\n"
                              f"    {last_line(log, 300)}")
                print(f"{clock()} {stage.name}: FAILED, exit code {process.exitcode}; see {log}", flush=True)
        if time.time() - heartbeat >= HEARTBEAT_SECONDS and running:
            heartbeat = time.time()
            for stage, _, _, log in running.values():
                print(f"{clock()}   {stage.name}: {last_line(log)}", flush=True)
    if failed:
        never = [stage.name for stage in waiting]
        raise SystemExit("stages failed: " + "; ".join(failed)
                         + (f"\nnot started, as they wait for a failed stage or came after it: {', '.join(never)}"
                            if never else ""))
    return minutes
