"""Mutation testing of the decisive-choice functions: does changing one thing fail a test?

Each docs page lists, numbered, the choices that make a file its paper, and names the function
that makes each one. This script changes those functions one small thing at a time (a constant,
a comparison, an operator, a string, a boolean, a keyword argument, a sign) and runs the given
tests on a copy of the repository; a mutant that passes every test "survived": either a test is
missing or the mutant is equivalent (then say why in the docs page).

    python tests/mutate.py dico.py --functions dico_loss rewards --tests tests/test_dico.py
    python tests/mutate.py altogether.py --functions sequence_labels --tests tests/test_altogether.py -k layout

Mutants run in a temporary copy of the git-tracked files, so the working tree is never touched.
Prints one line per mutant and a score; `--json` writes the survivors with their diffs.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
SWAP_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}
SWAP_NAME = {"max": "min", "min": "max", "amax": "amin", "amin": "amax", "argmax": "argmin", "argmin": "argmax",
             "mean": "sum", "sum": "mean", "left": "right", "right": "left", "detach": "clone"}
# imported once by the parent; each mutant's test run is a fork that imports only the project's modules
HEAVY_IMPORTS = ("torch", "numpy", "PIL.Image", "open_clip", "transformers", "tyro", "pytest", "tqdm")


@dataclass
class Mutant:
    line: int
    kind: str
    before: str
    after: str
    start: tuple[int, int]
    end: tuple[int, int]


def _constant_mutations(value) -> list:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1] + ([0] if value not in (0, 1) else [])
    if isinstance(value, float):
        return [value * 2 if value else 1.0]
    if isinstance(value, str) and value and "\n" not in value and len(value) < 200:
        return ["XX" + value + "XX"]
    return []


def mutants_of(node: ast.AST, source_lines: list[str]) -> list[Mutant]:
    """Every single-change mutant of the expressions inside `node` (a function definition)."""
    out = []

    def segment(n: ast.AST) -> str:
        return ast.get_source_segment("".join(source_lines), n) or ""

    def add(n: ast.AST, kind: str, replacement: ast.AST) -> None:
        before = segment(n)
        try:
            after = ast.unparse(replacement)
        except Exception:  # noqa: BLE001 (a node ast cannot print is not a mutant we can write)
            return
        if before and after != before:
            out.append(Mutant(n.lineno, kind, before, after, (n.lineno, n.col_offset),
                              (n.end_lineno, n.end_col_offset)))

    body = node.body[1:] if ast.get_docstring(node) else node.body  # the docstring is not behaviour
    for statement in body:
        for n in ast.walk(statement):
            if isinstance(n, ast.Constant):
                for value in _constant_mutations(n.value):
                    add(n, "constant", ast.Constant(value))
            elif isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in SWAP_COMPARE:
                add(n, "compare", ast.Compare(n.left, [SWAP_COMPARE[type(n.ops[0])]()], n.comparators))
            elif isinstance(n, ast.BinOp) and type(n.op) in SWAP_BINOP:
                add(n, "operator", ast.BinOp(n.left, SWAP_BINOP[type(n.op)](), n.right))
            elif isinstance(n, ast.BoolOp) and type(n.op) in SWAP_BOOLOP:
                add(n, "boolean", ast.BoolOp(SWAP_BOOLOP[type(n.op)](), n.values))
            elif isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.Not)):
                add(n, "sign" if isinstance(n.op, ast.USub) else "negation", n.operand)
            elif isinstance(n, ast.Attribute) and n.attr in SWAP_NAME:
                add(n, "name", ast.Attribute(n.value, SWAP_NAME[n.attr], n.ctx))
            elif isinstance(n, ast.Name) and n.id in SWAP_NAME:
                add(n, "name", ast.Name(SWAP_NAME[n.id], n.ctx))
            if isinstance(n, ast.Call):
                for i in range(len(n.keywords)):
                    if n.keywords[i].arg is not None:
                        kept = n.keywords[:i] + n.keywords[i + 1:]
                        add(n, f"drop {n.keywords[i].arg}=", ast.Call(n.func, n.args, kept))
    return out


def apply(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutant.start, mutant.end
    head = "".join(lines[:l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + "".join(lines[l1:])
    after = mutant.after if l0 == l1 else "(" + mutant.after + ")"  # a multi-line node keeps its bracket
    return head + after + tail


def find_functions(tree: ast.Module, names: list[str]) -> list[ast.AST]:
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            found.setdefault(node.name, node)
    missing = sorted(set(names) - set(found))
    if missing:
        raise SystemExit(f"mutate: no function named {missing} in the file")
    return [found[name] for name in names]


def copy_repo(destination: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(workdir: Path, tests: list[str], extra: list[str], timeout: float) -> str:
    """Run pytest on `workdir` in a forked child (third-party imports already paid for)."""
    pid = os.fork()
    if pid == 0:  # the child: a fresh import of the project's (mutated) modules, quiet output
        import pytest

        os.chdir(workdir)
        sys.path.insert(0, str(workdir))
        sys.dont_write_bytecode = True  # a mutant's .pyc must never be reused for the next one
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", *tests, *extra])
        os._exit(int(code))
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {0: "survived", 1: "killed"}.get(code, f"error (pytest exit {code})")
        time.sleep(0.2)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "killed (timeout)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the paper file (or any module) to mutate, relative to the repository")
    parser.add_argument("--functions", nargs="+", required=True, help="functions whose bodies are mutated")
    parser.add_argument("--tests", nargs="+", required=True, help="pytest paths or node ids that must catch them")
    parser.add_argument("-k", default=None, help="pytest -k expression to narrow the tests")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant before it counts as killed")
    parser.add_argument("--json", default=None, help="write every mutant's outcome here")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for module in HEAVY_IMPORTS:
        importlib.import_module(module)
    path = REPO / args.file
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    mutants = [m for fn in find_functions(tree, args.functions) for m in mutants_of(fn, lines)]
    extra = ["-k", args.k] if args.k else []
    results = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        work = Path(tmp)
        copy_repo(work)
        baseline = run_tests(work, args.tests, extra, args.timeout)
        if baseline != "survived":
            raise SystemExit(f"mutate: the tests do not pass on the unmutated code ({baseline})")
        for i, mutant in enumerate(mutants, 1):
            mutated = apply(source, mutant)
            try:
                ast.parse(mutated)
            except SyntaxError:
                continue
            (work / args.file).write_text(mutated)
            start = time.time()
            outcome = run_tests(work, args.tests, extra, args.timeout)
            (work / args.file).write_text(source)
            diff = "".join(difflib.unified_diff(source.splitlines(keepends=True), mutated.splitlines(keepends=True),
                                                n=0, fromfile=args.file, tofile=args.file))
            results.append({"line": mutant.line, "kind": mutant.kind, "before": mutant.before, "after": mutant.after,
                            "outcome": outcome, "seconds": round(time.time() - start, 1), "diff": diff})
            print(f"[{i}/{len(mutants)}] {args.file}:{mutant.line} {mutant.kind}: {mutant.before[:50]!r} -> "
                  f"{mutant.after[:50]!r}: {outcome}", flush=True)
    killed = sum(r["outcome"].startswith("killed") for r in results)
    survivors = [r for r in results if r["outcome"] == "survived"]
    report = {"file": args.file, "functions": args.functions, "tests": args.tests, "mutants": len(results),
              "killed": killed, "survived": len(survivors), "errors": len(results) - killed - len(survivors),
              "score": round(100.0 * killed / max(1, killed + len(survivors)), 1), "results": results}
    print(f"\n{args.file}: {killed} of {killed + len(survivors)} mutants killed ({report['score']}%), "
          f"{report['errors']} errored")
    for r in survivors:
        print(f"  survived {args.file}:{r['line']} {r['kind']}: {r['before'][:70]!r} -> {r['after'][:70]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
