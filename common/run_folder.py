"""The folder of one training run (<out>/<stage>): its state, checkpoints and log, resumed only with its recipe.

A run folder holds RUN_FILES. A rerun into it is refused unless asked to continue it (--resume, with the
settings its last.pt was trained with: `recipe`, checked by common.training.check_resume_recipe in `resume`) or
to replace it (--overwrite: `start_afresh`); a resumed run's log is cut back to the resumed step (`truncate_log`).
`Run` is a run's state from step to step, `save` writes it, `finish` its metrics.json. Checkpoints are loaded
with a clear error when missing, unreadable, of another program or holding NaN weights (`load_checkpoint`).
Nothing here knows a paper: the callers pass their names and messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from common.clip_train import save_checkpoint
from common.data import NonFiniteError, atomic_write_text
from common.training import check_resume_recipe, guard_where

RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json")  # what a stage writes into <out>/<stage>


def refuse(message: str) -> SystemExit:
    """A setting the user fixes: one line on stderr and exit status 1, no traceback (common.data.run_command)."""
    return SystemExit(f"error: {message}")


def flag(name: str) -> str:
    """The command-line flag of a dataclass field."""
    return "--" + name.replace("_", "-")


def load_checkpoint(path, required: Iterable[str], program: str, missing_hint: str,
                    check: Optional[Callable[[Path, dict], None]] = None) -> dict:
    """The checkpoint at `path`, or a clear error when the file is missing, corrupted, another program's (a key of
    `required` missing), refused by `check` (the caller's own test, raising) or holds NaN weights under "model" (a
    diverged run's, which would be used as a model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} ({missing_hint})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        raise refuse(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); it is corrupted or truncated: "
                     "delete it and rerun (or resume from another)") from err
    required = tuple(required)
    if not isinstance(payload, dict) or not set(required) <= set(payload):
        raise refuse(f"{path} is not a {program} checkpoint (needs {', '.join(required[:-1])} and {required[-1]})")
    if check is not None:
        check(path, payload)
    weights = payload.get("model", {})
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise NonFiniteError(f"{path}: {len(bad)} of {len(weights)} weight tensors hold NaN or inf "
                             f"({', '.join(bad[:3])}): a diverged run's weights, not a model")
    return payload


def weights_digest(payload: dict) -> str:
    """A hash of a checkpoint's model (weights, "config", "vocab"): equal hashes compute alike."""
    digest = hashlib.sha256(json.dumps([payload["config"], payload["vocab"]]).encode())
    for name, tensor in sorted(payload["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_log(path: Path, row: dict) -> None:
    """One JSON row appended to the run's log."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """The log of a run resumed at `step`: its rows up to that step, so that each step it runs again appears once
    (a last row that the stop cut short goes too)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
    atomic_write_text(path, "".join(rows))


def start_afresh(out: Path, stage: str, rank: int, overwrite: bool, resume: bool) -> None:
    """<out> cleared for a run from step 0. A run there is replaced only when asked (`overwrite`, or `resume` of a
    run that stopped before its first last.pt), else refused: a rerun would replace its best.pt."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (overwrite or resume):
        raise refuse(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite to "
                     "replace it, or another --out")
    if found and rank == 0:
        print(f"[{stage}] replacing the run in {out} ({', '.join(found)}): starting at step 0")
        for name in found:
            (out / name).unlink()


def recipe(args, names: Iterable[str]) -> dict:
    """{field: value} of the fields `names` of `args`, a dataclass field flattened ("world.n_train"), as JSON holds
    it: the form a checkpoint stores and common.training.check_resume_recipe compares and names as flags."""
    values = {}
    for name in names:
        value = getattr(args, name)
        if dataclasses.is_dataclass(value):
            values.update({f"{name}.{key}": v for key, v in dataclasses.asdict(value).items()})
        else:
            values[name] = value
    return json.loads(json.dumps(values))


@dataclass
class Run:
    """A training run's state from step to step: what its checkpoints hold and its messages name."""

    stage: str
    out: Path  # <out>/<stage>
    steps: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    recipe: dict  # what a resumed run must match (`recipe`)
    saved_with: dict  # what every checkpoint holds besides the state: how to rebuild the model, say
    step: int = 0
    best: float = -math.inf  # the best validation metric so far (best.pt's)
    saved: Optional[int] = None  # the step last.pt holds
    labels: dict = field(default_factory=dict)  # the validation metrics' text labels (how they were computed)

    def where(self, step: int, when: str) -> str:
        """A diverged run's message (common.training.guard_where): the step, and what last.pt still holds."""
        return guard_where(self.stage, step, self.steps, when, self.out / "last.pt", self.saved)


def opens_resumed(out: Path, stage: str, rank: int, resume: bool, overwrite: bool) -> bool:
    """True when the run in `out` continues from its last.pt (`resume`); else `out` is cleared (`start_afresh`)
    for a run from step 0, and created."""
    resuming = resume and (out / "last.pt").exists()
    if not resuming:
        start_afresh(out, stage, rank, overwrite, resume)
    out.mkdir(parents=True, exist_ok=True)
    return resuming


def resume(run: Run, rank: int, load: Callable[[Path], dict], start_afresh_flag: str = "--overwrite") -> None:
    """`run` continued from its last.pt (read by `load`), only with the recipe it was trained with: else the
    optimizer state would restore, say, the old learning rate. Its log is cut back to the resumed step."""
    path = run.out / "last.pt"
    state = load(path)
    check_resume_recipe(path, state.get("recipe"), run.recipe, start_afresh_flag)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])  # its learning rate: the recipe's, checked above
    run.step, run.best = state["step"], state["best"]
    run.saved = run.step
    if rank == 0:
        truncate_log(run.out / "log.jsonl", run.step)
    print(f"[{run.stage}] resuming from step {run.step} ({path})")


def save(run: Run, path: Path, args, metrics: Optional[dict] = None) -> None:
    """A checkpoint of `run` at `path`: its state, recipe, `saved_with`, these metrics and the run's `args`."""
    save_checkpoint(path, {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
                           "best": run.best, **run.saved_with, "stage": run.stage, "recipe": run.recipe,
                           "metrics": metrics or {}, "args": json.loads(json.dumps(dataclasses.asdict(args)))})


def finish(run: Run, select: str, bad: set, rank: int, world_size: int, started: float) -> dict:
    """metrics.json of the run (rank 0): its best validation `select` and the unreadable images (`bad`, their ids)
    of every rank; returns it with the paths of last.pt and best.pt ({} on the other ranks)."""
    if world_size > 1:  # each rank met its own unreadable images
        gathered = [None] * world_size
        dist.all_gather_object(gathered, bad)
        bad = set().union(*gathered)
    if rank != 0:
        return {}
    if bad:
        print(f"[{run.stage}] {len(bad)} unreadable images skipped, e.g. {sorted(bad)[:5]} (--strict stops at the "
              "first)")
    report = {f"best_val_{select}": run.best, "unreadable_images": len(bad), "unreadable_ids": sorted(bad)[:20],
              **run.labels}
    atomic_write_text(run.out / "metrics.json", json.dumps({"step": run.step, **report,
                                                            "seconds": time.time() - started}, indent=1))
    return {**report, "last": str(run.out / "last.pt"), "best": str(run.out / "best.pt")}
