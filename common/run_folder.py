"""The folder of one training run (<out>/<stage>): its checkpoints, its log, and resuming it only with its recipe.

A run folder holds RUN_FILES. A rerun into it is refused unless asked to continue it (--resume, with the
settings its last.pt was trained with: `recipe` and `check_recipe`) or to replace it (--overwrite:
`start_afresh`); a resumed run's log is cut back to the resumed step (`truncate_log`). Checkpoints are
loaded with a clear error when missing, unreadable, of another program or holding NaN weights
(`load_checkpoint`). Nothing here knows a paper: the callers pass their names and messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from common.data import NonFiniteError, atomic_write_text

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
    """{flag: value} of the fields `names` of `args`, a dataclass field (--world.n-train) flattened, as JSON holds
    it (the form a checkpoint stores and `check_recipe` compares)."""
    values = {}
    for name in names:
        value = getattr(args, name)
        if dataclasses.is_dataclass(value):
            values.update({f"{flag(name)}.{key.replace('_', '-')}": v for key, v in dataclasses.asdict(value).items()})
        else:
            values[flag(name)] = value
    return json.loads(json.dumps(values))


def check_recipe(path: Path, saved: Optional[dict], wanted: dict, program: str) -> None:
    """Refuse to resume the checkpoint at `path` with other settings, naming the flags that differ with the saved and
    the wanted values."""
    if saved is None:
        raise refuse(f"{path} holds no recipe (an older {program} wrote it), so its settings cannot be checked: start "
                     "a new run with another --out, or with --overwrite instead of --resume")
    differ = sorted(name for name in saved.keys() | wanted.keys() if saved.get(name) != wanted.get(name))
    if differ:
        was, now = (" ".join(f"{name} {values.get(name)}" for name in differ) for values in (saved, wanted))
        raise refuse(f"{path} was trained with {was}, not {now}: resume with its flags, or start a new run with "
                     "another --out (or --overwrite instead of --resume)")
