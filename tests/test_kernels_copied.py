"""Each caption_kernels/ file copied alone into another project (only torch and triton importable, no `caption_kernels`
or `common` package) imports and computes what the repository's module computes, Triton path included
(TRITON_INTERPRET=1, as in every kernel test)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: run the kernels in numpy

import importlib.util
import shutil
import sys

import pytest
import torch

import caption_kernels.contrastive
import caption_kernels.dico


def copied_alone(module, tmp_path, monkeypatch):
    """Import a copy of `module`'s file from a fresh folder, with the project's packages unimportable."""
    project = tmp_path / "other_project"
    project.mkdir(exist_ok=True)
    name = os.path.basename(module.__file__)
    shutil.copy(module.__file__, project / name)
    monkeypatch.chdir(project)
    for package in ("caption_kernels", "caption_kernels.contrastive", "caption_kernels.dico", "common"):
        monkeypatch.setitem(sys.modules, package, None)  # `import caption_kernels...` fails, as in another project
    spec = importlib.util.spec_from_file_location(name[:-3], project / name)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name[:-3], copy)
    spec.loader.exec_module(copy)
    return copy


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_contrastive_copied_alone_computes_the_same_losses_and_gradients(tmp_path, monkeypatch, impl):
    torch.manual_seed(0)
    img, txt = torch.randn(7, 12), torch.randn(7, 12)
    expected = [caption_kernels.contrastive.clip_loss(img, txt, 10.0, impl=impl),
                caption_kernels.contrastive.siglip_loss(img, txt, 10.0, -10.0, impl=impl)]
    copy = copied_alone(caption_kernels.contrastive, tmp_path, monkeypatch)
    img_grad = img.clone().requires_grad_()
    got = [copy.clip_loss(img_grad, txt, 10.0, impl=impl), copy.siglip_loss(img, txt, 10.0, -10.0, impl=impl)]
    torch.testing.assert_close(torch.stack(got), torch.stack(expected))
    got[0].backward()
    reference = img.clone().requires_grad_()
    caption_kernels.contrastive.clip_loss(reference, txt, 10.0, impl=impl).backward()
    torch.testing.assert_close(img_grad.grad, reference.grad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dico_copied_alone_computes_the_same_loss_and_log_probs(tmp_path, monkeypatch, impl):
    torch.manual_seed(0)
    policy, ref, rewards = torch.randn(3, 5), torch.randn(3, 5), torch.rand(3, 5)
    logits, targets, mask = torch.randn(4, 6, 9), torch.randint(0, 9, (4, 6)), torch.rand(4, 6) > 0.3
    expected = (caption_kernels.dico.dico_loss(policy, ref, rewards, impl=impl),
                caption_kernels.dico.sequence_logprobs(logits, targets, mask, impl=impl))
    copy = copied_alone(caption_kernels.dico, tmp_path, monkeypatch)
    got = (copy.dico_loss(policy, ref, rewards, impl=impl), copy.sequence_logprobs(logits, targets, mask, impl=impl))
    torch.testing.assert_close(got, expected)
