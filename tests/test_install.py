"""The installed environment meets the project: no import name of ours shadows an installed one, and
transformers loads models from the repository root with their layers as the checkpoint defines them."""

import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_import_names(root: Path) -> set[str]:
    """What `import X` finds at the repository root: each top-level `.py` and each folder with `__init__.py`."""
    return {path.stem for path in root.glob("*.py")} | {path.parent.name for path in root.glob("*/__init__.py")}


def shadowed(root: Path, installed: dict[str, list[str]]) -> list[str]:
    """One line per project import name that an installed distribution also provides."""
    return [f"the project's {name!r} shadows the import name {name!r} of the installed distribution(s) "
            f"{', '.join(sorted(set(installed[name])))}"
            for name in sorted(project_import_names(root)) if name in installed]


def test_no_project_import_name_shadows_an_installed_distribution():
    clashes = shadowed(ROOT, importlib.metadata.packages_distributions())
    assert not clashes, "; ".join(clashes) + ": rename the project's module or package"


def test_the_guard_names_a_kernels_package_put_back(tmp_path):
    """A `kernels/` package at the root is what broke transformers 5 (its hub integration imports HF `kernels`)."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "veclip.py").write_text("")
    (tmp_path / "data").mkdir()  # a folder without __init__.py is no import name
    installed = {"kernels": ["kernels"], "data": ["some-dist"], "numpy": ["numpy"]}
    assert shadowed(tmp_path, installed) == [
        "the project's 'kernels' shadows the import name 'kernels' of the installed distribution(s) kernels"]


def test_transformers_hub_kernels_import_from_the_repository_root_and_load_model_keeps_the_layers(tmp_path):
    """transformers 5 imports HF `kernels` here; from the repository root that must be the installed package.
    `load_model` passes use_kernels=False: transformers 5 would otherwise default to True when `kernels` is
    installed and swap layers for hub kernels (other numerics, a download at run time on a GPU)."""
    import sys

    import torch

    assert str(ROOT) in sys.path  # conftest puts the root first, as `python -m pytest` from the checkout does
    pytest.importorskip("transformers.integrations.hub_kernels")
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    from common.data import load_model

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, vocab_size=50, max_position_embeddings=32)
    OPTForCausalLM(config).save_pretrained(tmp_path / "tiny-opt")
    model = load_model(AutoModelForCausalLM, str(tmp_path / "tiny-opt"), "--decoder")
    assert type(model).__name__ == "OPTForCausalLM"
    assert getattr(model, "use_kernels", False) is False  # transformers >= 5 records the choice on the model

    calls = []

    class Recorder:
        @staticmethod
        def from_pretrained(name, **kwargs):
            calls.append(kwargs)

    load_model(Recorder, "any", "--decoder", dtype=torch.float32)
    assert calls == [{"use_kernels": False, "dtype": torch.float32}]


def test_a_missing_model_is_one_line_naming_the_flag(tmp_path, capsys):
    """Offline, a hub name that is not cached: the command line ends with one `error:` line naming the flag."""
    from transformers import AutoTokenizer

    from common.data import MissingWeightsError, load_pretrained, run_command

    def main(argv):
        return load_pretrained(AutoTokenizer, str(tmp_path / "no-such-model"), "--llm")

    with pytest.raises(MissingWeightsError, match="for --llm .* Pass --llm a local folder"):
        main([])
    with pytest.raises(SystemExit) as stop:
        run_command(main, [])
    assert str(stop.value).startswith("error: cannot load") and "\n" not in str(stop.value)
