"""The documentation holds: every paper file's header has its parts, every quoted command parses.

A command is any line of README.md, docs/*.md, docs/*.sh or a module docstring that starts with `python` or
`torchrun` (backslash continuations joined, `NAME="..."` shell variables of the same text
expanded). Each is parsed by its script's own command-line parser, which is stopped right after
parsing: nothing runs, nothing is downloaded.
"""

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parents[1]
PAPER_FILES = ("veclip.py", "capsfusion.py", "altogether.py", "dico.py", "clip_quality.py")
NOT_OURS = ("pytest", "pip")  # `python -m pytest`, `python -m pip` are not this project's scripts


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def documented_texts() -> dict[str, str]:
    """{source name: text} for README.md, docs/*.md, docs/*.sh and the docstring of every top-level/common/kernels
    module."""
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({f"docs/{p.name}": p.read_text()
                  for p in sorted([*(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*.sh")])})
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("common/*.py"), *ROOT.glob("caption_kernels/*.py")]):
        texts[str(path.relative_to(ROOT))] = docstring(path)
    return texts


def commands_in(text: str) -> list[str]:
    """The `python ...` / `torchrun ...` commands of a text, continuations joined, variables expanded."""
    joined = re.sub(r"\\\s*\n\s*", " ", text)
    variables = dict(re.findall(r'^\s*([A-Z_]+)="([^"]*)"\s*$', joined, flags=re.M))
    commands = []
    for line in joined.splitlines():
        spans = re.findall(r"`([^`]+)`", line) or [line]  # inline code in prose, else the whole line
        for part in (piece.strip() for span in spans for piece in span.split("&&")):
            if not re.match(r"(python3?|torchrun)\s", part):
                continue
            for name, value in variables.items():
                part = part.replace(f"${{{name}}}", value).replace(f"${name}", value)
            commands.append(part)
    return commands


def script_and_argv(command: str) -> tuple[str, list[str]] | None:
    """(module name, arguments) of a command, or None when it runs nobody's script of ours."""
    words = shlex.split(command, comments=True)
    words = words[1:]
    if command.startswith("torchrun"):  # torchrun's own options come before the script
        while words and words[0].startswith("--"):
            words = words[1:] if "=" in words[0] else words[2:]
    if not words:
        return None
    if words[0] == "-m":
        module, argv = words[1], words[2:]
    elif words[0].endswith(".py"):
        module, argv = words[0][:-3].replace("/", "."), words[1:]
    else:
        return None
    if module.split(".")[0] in NOT_OURS:
        return None
    return module, argv


class Parsed(Exception):
    """Raised by the patched parsers once the arguments are parsed: the command is valid."""


ALL_COMMANDS = sorted({(source, command) for source, text in documented_texts().items() for command in commands_in(text)
                       if script_and_argv(command) is not None})


def test_the_documentation_quotes_commands():
    sources = {source for source, _ in ALL_COMMANDS}
    assert "README.md" in sources
    for paper in PAPER_FILES:
        assert paper in sources, f"{paper}'s docstring quotes no command"


@pytest.mark.parametrize("source,command", ALL_COMMANDS, ids=[f"{s}: {c[:60]}" for s, c in ALL_COMMANDS])
def test_every_quoted_command_parses(source, command, monkeypatch):
    module_name, argv = script_and_argv(command)
    module = importlib.import_module(module_name)
    real_cli, real_parse = tyro.cli, argparse.ArgumentParser.parse_args

    def parse_then_stop(*args, **kwargs):
        real_cli(*args, **kwargs)
        raise Parsed

    def argparse_then_stop(self, *args, **kwargs):
        real_parse(self, *args, **kwargs)
        raise Parsed

    monkeypatch.setattr(tyro, "cli", parse_then_stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", argparse_then_stop)
    if "--help" in argv or "-h" in argv:  # the parser prints the help and exits 0
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        assert exit_.value.code == 0, f"{source}: `{command}` exits {exit_.value.code}"
        return
    with pytest.raises(Parsed):
        try:
            module.main(argv)
        except SystemExit as exit_:  # a parser error: show which command of which file
            raise AssertionError(f"{source}: `{command}` does not parse (exit {exit_.code})") from exit_


@pytest.mark.parametrize("paper", PAPER_FILES)
def test_paper_header_has_its_parts(paper):
    path = ROOT / paper
    assert path.exists(), f"{paper} is missing"
    text = docstring(path)
    assert re.search(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}", text), f"{paper}: no arXiv link"
    assert re.search(r"^Implements", text, flags=re.M), f"{paper}: no 'Implements' section"
    deviations = text.find("Deviations from the paper")
    assert deviations >= 0 and re.search(r"^\s*1\.\s", text[deviations:], flags=re.M), \
        f"{paper}: no numbered deviations"
    # results and timings live in docs/ and the README, written from the runs, never in a header
    assert not re.search(r"±|\bmeasured\b|\d\s*(min|minutes|s each)\b", text, flags=re.I), \
        f"{paper}: results in the header"
    stem = path.stem
    assert any(re.match(rf"(python3?|torchrun)\s.*\b{stem}\.py", c) for c in commands_in(text)), \
        f"{paper}: its docstring quotes no command that runs it"


@pytest.mark.parametrize("paper", PAPER_FILES)
def test_each_step_of_the_header_is_tagged_where_it_is_computed(paper):
    """The header's numbered `Implements` list: step N has a `# step N` comment at the line that computes it
    (`# steps 4-6` where caption_kernels/ computes several, with the formula at the call)."""
    source = (ROOT / paper).read_text()
    implements = docstring(ROOT / paper).split("Implements", 1)[1].split("Deviations from the paper", 1)[0]
    steps = {int(n) for n in re.findall(r"^\s+(\d+)\.", implements, flags=re.M)}
    tagged = set()
    for first, last in re.findall(r"#[^\n]*\bsteps? (\d+)(?:-(\d+))?\b", source):
        tagged |= set(range(int(first), int(last or first) + 1))
    assert steps and steps <= tagged, f"{paper}: steps {sorted(steps - tagged)} have no `# step N` tag"
