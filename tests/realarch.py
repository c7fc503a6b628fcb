"""Tiny random-weight stand-ins of the real models that the documented commands name.

The real-architecture test tier runs each real command's code path with the *same classes and
structural settings* as the real model, at tiny width, offline:

- `serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai")` shrinks the built-in open_clip
  config of that architecture (widths, depths, heads; every flag kept: quick_gelu, pooling, norms,
  image size, patch size, context length, vocabulary) and answers the tag's Hugging Face download
  with a local safetensors file of random weights, as a warm cache would. Nothing else in
  open_clip is touched: the tag's own settings (quick_gelu, mean/std, interpolation) still come
  from `open_clip.get_pretrained_cfg`, so code that ignores them builds the wrong model here too.
- `save_hf(model, folder, dtype)` saves a `from_config` transformers model in the dtype the real
  checkpoint ships (fp16 for OPT and Llama), so code that trusts the checkpoint's dtype fails here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

TINY_WIDTH = {"embed_dim": 32, "vision_width": 64, "vision_layers": 2, "text_width": 32, "text_layers": 2, "heads": 2}


def tiny_open_clip_config(name: str) -> dict:
    """The built-in config of `name` with every size shrunk and every flag kept."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"{name!r} is not a built-in open_clip architecture")
    if "timm_model_name" in config["vision_cfg"] or "hf_model_name" in config["text_cfg"]:
        raise ValueError(f"{name!r} uses a timm or Hugging Face tower; shrink it by hand")
    config = copy.deepcopy(config)
    config["embed_dim"] = TINY_WIDTH["embed_dim"]
    vision, text = config["vision_cfg"], config["text_cfg"]
    vision.update(width=TINY_WIDTH["vision_width"], layers=TINY_WIDTH["vision_layers"])
    if "head_width" in vision:
        vision["head_width"] = TINY_WIDTH["vision_width"] // TINY_WIDTH["heads"]
    text.update(width=TINY_WIDTH["text_width"], layers=TINY_WIDTH["text_layers"], heads=TINY_WIDTH["heads"])
    return config


def serve_open_clip_tag(monkeypatch, tmp_path: Path, name: str, tag: str | None = None, seed: int = 0):
    """Make `open_clip.create_model(name, pretrained=tag)` build the tiny config and load random weights.

    Returns (weights_path, model): the file the download resolves to, and an fp32 model of the tiny
    config built with the tag's activation, holding exactly those weights (the reference to
    compare against). With tag=None only the config is shrunk (random weights, no download).
    """
    tiny = tiny_open_clip_config(name)
    builtin = open_clip.factory.get_model_config

    def get_model_config(model_name):  # a lookup, not the registry: add_model_config rescans that
        return copy.deepcopy(tiny) if model_name == name else builtin(model_name)

    monkeypatch.setattr(open_clip.factory, "get_model_config", get_model_config)
    tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    if tag and not tag_cfg:
        raise ValueError(f"{tag!r} is not an open_clip tag of {name}")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    for module in model.modules():
        # open_clip never initialises CoCa's text decoder projection (MultimodalTransformer.init_parameters is never
        # called, and would fail on `self.transformer`), so it is torch.empty memory: whatever an earlier test left
        # there (1e20 once, making the tiny CoCa's samples garbage). Drawn as that init_parameters means to.
        if isinstance(module, open_clip.transformer.MultimodalTransformer):
            torch.nn.init.normal_(module.text_projection, std=module.width ** -0.5)
    model.eval()
    if not tag:
        return None, model
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise ValueError(f"{name}@{tag} has no Hugging Face repository to redirect")
    repo_id, _ = os.path.split(hub)  # open_clip's own split: "org/model/" or "org/model/file"
    folder = tmp_path / "hf-cache" / repo_id.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "open_clip_model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))

    served_repo = repo_id

    def hf_hub_download(repo_id: str, filename: str, revision=None, cache_dir=None, **_):
        if repo_id != served_repo:
            raise FileNotFoundError(f"test cache holds no repository {repo_id}")
        if not filename.endswith(".safetensors"):
            raise FileNotFoundError(f"test cache holds only the safetensors file of {repo_id}, not {filename}")
        return str(weights)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    return weights, model


def save_hf(model: torch.nn.Module, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save a transformers model in the dtype its real checkpoint ships (fp16 for OPT and Llama)."""
    model.to(dtype).save_pretrained(folder)
    return Path(folder)


def free_port() -> int:
    """A TCP port nobody listens on now (for a test's own rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str, argv: list[str], nproc: int = 2, timeout: float = 240, env: dict | None = None):
    """Run `torchrun --nproc-per-node nproc script argv` (gloo on the CPU), as a user would, offline.

    The launcher is torchrun's own `main`, run in a forked copy of this process (it inherits the torch import,
    about 5 s of a fresh interpreter's start); the ranks are fresh processes, as under the command line.
    A non-zero exit or a run over `timeout` seconds raises with the end of the ranks' output.
    """
    import signal
    import tempfile
    import time
    import traceback

    repo = Path(__file__).resolve().parents[1]
    launcher_args = [f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                     str(repo / script), *argv]
    run_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo),
               "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    log = Path(tempfile.mkstemp(prefix="torchrun-", suffix=".log")[1])
    pid = os.fork()
    if pid == 0:  # the launcher: its own process group, so that a timeout can stop it and its ranks together
        code = 1
        try:
            os.setpgrp()
            os.chdir(repo)
            os.environ.update(run_env)
            out = os.open(log, os.O_WRONLY | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            from torch.distributed.run import main as torchrun_main

            torchrun_main(launcher_args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"torchrun {script} ran over {timeout} s:\n{log.read_text()[-5000:]}")
        time.sleep(0.1)
    output = log.read_text()
    log.unlink()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise AssertionError(f"torchrun {script} exited {code}:\n{output[-8000:]}")
    return output


def assert_same_weights(a: dict, b: dict, atol: float = 2e-5) -> None:
    """Two state dicts hold the same weights, up to `atol`, except attention key biases.

    A key bias adds the same number to every logit of a softmax row, so its gradient is zero in exact arithmetic;
    Adam divides the rounding noise left there by its own tiny running scale and steps up to lr. Those entries
    differ between two orders of summation (1 process vs 2 ranks, 1 batch vs micro-batches) by design.
    """
    for name, value in a.items():
        other = b[name]
        if name.endswith("in_proj_bias"):  # (q, k, v) stacked: compare q and v
            third = len(value) // 3
            value, other = (torch.cat([t[:third], t[2 * third:]]) for t in (value, other))
        assert torch.allclose(value, other, atol=atol), f"{name}: max difference {(value - other).abs().max():.2e}"


def run_forked_ranks(worker, args: tuple, nprocs: int = 2, timeout: float = 120) -> None:
    """Run `worker(rank, *args)` in `nprocs` forked processes and wait; a failed rank raises, a hung one fails.

    Fork, not spawn: the ranks inherit this process's imports (torch, open_clip, triton) and objects instead of
    paying for them again. A worker sets torch.set_num_threads(1) first: libgomp's pool does not survive a fork.
    """
    import time

    ranks = torch.multiprocessing.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.time() + timeout
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.time() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {nprocs} forked ranks did not finish in {timeout:.0f} s")
