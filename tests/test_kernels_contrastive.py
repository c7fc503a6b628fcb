"""caption_kernels/contrastive.py against open_clip's ClipLoss and SigLipLoss, on the CPU.

The Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); the reference is open_clip's dense loss in float64 on the same (rounded) inputs, so
the measured error is ours alone. GPU speed is the benchmark's business (`python -m caption_kernels.bench`).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.loss import ClipLoss, SigLipLoss  # noqa: E402

from caption_kernels import contrastive  # noqa: E402
from caption_kernels.contrastive import clip_loss, siglip_loss  # noqa: E402

pytest.importorskip("triton")

# relative error (vector norm) allowed against float64: float32 inputs get float32 accuracy; bf16
# inputs round the G - I strip to 8 bits (measured ~4e-3), while a wrong term is >= 1e-1 off.
# ABSOLUTE_FLOOR covers outputs that are zero up to rounding (N = 1, sigmoid(90) = 1): float32
# logits of size 100 carry 8e-6 of rounding each, which a zero loss cannot hide.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ABSOLUTE_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
SIZES = [(n, d) for n in (1, 3, 65, 130) for d in (8, 48, 96)]
# the kernels at every awkward size; the PyTorch reference (plain torch ops) at a spread of them
IMPLS_AND_SIZES = [("triton", n, d) for n, d in SIZES] + [
    ("torch", n, d) for n, d in [(1, 8), (3, 48), (65, 96), (130, 48)]]


def make_features(n, d, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def loss_and_grads(loss_fn, img, txt, scale, bias=None):
    """Loss and the gradients of every input (features, scale, bias), as float64."""
    img = img.detach().clone().requires_grad_(True)
    txt = txt.detach().clone().requires_grad_(True)
    leaves = [img, txt, torch.tensor(float(scale), dtype=torch.float32, requires_grad=True)]
    if bias is not None:
        leaves.append(torch.tensor(float(bias), dtype=torch.float32, requires_grad=True))
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach().double()] + [leaf.grad.double() for leaf in leaves]


def open_clip_reference(siglip, img, txt, scale, bias=None):
    img64, txt64 = img.double(), txt.double()
    if siglip:
        return loss_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s.double(), b.double()),
                              img64, txt64, scale, bias)
    return loss_and_grads(lambda i, t, s: ClipLoss()(i, t, s.double()), img64, txt64, scale)


def ours(siglip, impl, img, txt, scale, bias=None):
    if siglip:
        return loss_and_grads(lambda i, t, s, b: siglip_loss(i, t, s, b, impl=impl),
                              img, txt, scale, bias)
    return loss_and_grads(lambda i, t, s: clip_loss(i, t, s, impl=impl), img, txt, scale)


def relative_error(got, want, dtype):
    """||got - want|| / ||want||, with ||want|| floored at ABSOLUTE_FLOOR / TOLERANCE."""
    return float((got - want).norm() / want.norm().clamp_min(ABSOLUTE_FLOOR[dtype] / TOLERANCE[dtype]))


def relative_errors(got, want, dtype):
    names = ["loss", "d_img", "d_txt", "d_scale", "d_bias"]
    return {name: relative_error(g, w, dtype) for name, g, w in zip(names, got, want)}


def assert_close(got, want, dtype):
    errors = relative_errors(got, want, dtype)
    bad = {name: error for name, error in errors.items() if not error <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]:.0e}: {bad}"


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl,n,d", IMPLS_AND_SIZES)
def test_matches_open_clip(siglip, impl, dtype, n, d):
    """Large scale (100, where softmaxes are sharp) and SigLIP's initial bias (-10)."""
    img, txt = make_features(n, d, seed=n * 1000 + d, dtype=dtype)
    want = open_clip_reference(siglip, img, txt, 100.0, -10.0)
    assert_close(ours(siglip, impl, img, txt, 100.0, -10.0), want, dtype)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d", [(3, 8), (130, 48)])
def test_small_scale_positive_bias(siglip, dtype, n, d):
    """Scale 1 (flat softmaxes, every column matters) and a positive bias."""
    img, txt = make_features(n, d, seed=7, dtype=dtype)
    want = open_clip_reference(siglip, img, txt, 1.0, 2.0)
    assert_close(ours(siglip, "triton", img, txt, 1.0, 2.0), want, dtype)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_features(siglip, dtype):
    """D = 1030: many depth slices and a ragged last one (CLIP's D goes up to 1024)."""
    img, txt = make_features(5, 1030, seed=9, dtype=dtype)
    want = open_clip_reference(siglip, img, txt, 100.0, -10.0)
    assert_close(ours(siglip, "triton", img, txt, 100.0, -10.0), want, dtype)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_confident_rows_keep_their_gradient_in_bf16(siglip):
    """Aligned pairs at scale 100: G_ii ~ 1, so G - I must be formed before rounding to bf16."""
    img, _ = make_features(65, 48, seed=3, dtype=torch.bfloat16)
    txt = F.normalize(img.double() + 0.05 * make_features(65, 48, seed=4)[0].double(), dim=-1)
    txt = txt.to(torch.bfloat16)
    want = open_clip_reference(siglip, img, txt, 100.0, -10.0)
    assert_close(ours(siglip, "triton", img, txt, 100.0, -10.0), want, torch.bfloat16)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_non_contiguous_inputs(impl):
    """A strided slice and a transposed (column-major) view give the same loss and gradients."""
    img, txt = make_features(65, 48, seed=5)
    strided_img = torch.zeros(65, 96).index_copy_(1, torch.arange(0, 96, 2), img)[:, ::2]
    transposed_txt = txt.T.contiguous().T
    assert not strided_img.is_contiguous() and not transposed_txt.is_contiguous()
    for siglip in (False, True):
        want = open_clip_reference(siglip, img, txt, 30.0, -5.0)
        assert_close(ours(siglip, impl, strided_img, transposed_txt, 30.0, -5.0), want,
                     torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strips_and_launches_merge_exactly(impl, monkeypatch):
    """A workspace of one block forces many strips/launches; their merge must be exact."""
    monkeypatch.setattr(contrastive, "_WORKSPACE_BYTES", 1)
    monkeypatch.setattr(contrastive, "_MIN_STRIP_ROWS", 1)
    img, txt = make_features(130, 48, seed=6)
    for siglip in (False, True):
        want = open_clip_reference(siglip, img, txt, 100.0, -10.0)
        assert_close(ours(siglip, impl, img, txt, 100.0, -10.0), want, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the unwritten tile is garbage
def test_a_dropped_column_tile_is_caught(monkeypatch):
    """The parity check has teeth: launching one column program too few must fail it."""
    img, txt = make_features(130, 48, seed=8)
    want = open_clip_reference(False, img, txt, 100.0)
    assert_close(ours(False, "triton", img, txt, 100.0), want, torch.float32)
    monkeypatch.setattr(contrastive, "_grid", lambda rows, columns: (rows, columns - 1))
    with torch.no_grad():
        wrong_loss = clip_loss(img, txt, 100.0, impl="triton").double()
    assert not torch.allclose(wrong_loss, want[0], rtol=1e-3)
    errors = relative_errors(ours(False, "triton", img, txt, 100.0), want, torch.float32)
    assert not all(error <= TOLERANCE[torch.float32] for error in errors.values())


def test_auto_uses_the_reference_on_cpu():
    img, txt = make_features(3, 8)
    assert contrastive._resolve_impl("auto", img.device) == "torch"
    torch.testing.assert_close(clip_loss(img, txt, 10.0), clip_loss(img, txt, 10.0, impl="torch"))


def test_bad_inputs_raise_clear_errors(monkeypatch):
    img, txt = make_features(4, 8)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(img[0], txt[0], 10.0)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(img, txt[:3], 10.0)
    with pytest.raises(ValueError, match="same shape"):
        siglip_loss(img, txt[:, :4], 10.0, -10.0)
    with pytest.raises(TypeError, match="same dtype"):
        clip_loss(img, txt.double(), 10.0)
    with pytest.raises(ValueError, match="meta"):
        clip_loss(img, txt.to("meta"), 10.0)
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        clip_loss(img, txt, torch.tensor(10.0, device="meta"))
    with pytest.raises(ValueError, match="one number"):
        clip_loss(img, txt, torch.ones(2))
    with pytest.raises(TypeError, match="dtype"):
        clip_loss(img.long(), txt.long(), 10.0)
    with pytest.raises(TypeError, match="float64"):
        clip_loss(img.double(), txt.double(), 10.0, impl="triton")
    with pytest.raises(ValueError, match="impl must be"):
        clip_loss(img, txt, 10.0, impl="cuda")
    with pytest.raises(TypeError, match="torch.Tensor"):
        clip_loss(img.tolist(), txt, 10.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        clip_loss(img, txt, 10.0, impl="triton")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        clip_loss(img, txt, 10.0, distributed=True)


# ----------------------------------------------------------------------------------------------
# Two CPU processes on gloo: distributed=True against open_clip and the single-process loss
# ----------------------------------------------------------------------------------------------

WORLD_SIZE, LOCAL_N, DIM = 2, 33, 24


def _distributed_worker(rank, port):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (libgomp is not fork-safe)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        all_img, all_txt = make_features(WORLD_SIZE * LOCAL_N, DIM, seed=11)
        mine = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        img, txt = all_img[mine], all_txt[mine]
        for siglip in (False, True):
            single = open_clip_reference(siglip, all_img, all_txt, 20.0, -3.0)
            if siglip:
                peer = SigLipLoss(rank=rank, world_size=WORLD_SIZE)
                peer_fn = lambda i, t, s, b: peer(i, t, s.double(), b.double())  # noqa: E731
            else:
                peer = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                world_size=WORLD_SIZE)
                peer_fn = lambda i, t, s: peer(i, t, s.double())  # noqa: E731
            open_clip_rank = loss_and_grads(peer_fn, img.double(), txt.double(), 20.0,
                                            -3.0 if siglip else None)
            for impl in ("triton", "torch"):
                kwargs = dict(impl=impl, distributed=True)
                if siglip:
                    fn = lambda i, t, s, b: siglip_loss(i, t, s, b, **kwargs)  # noqa: E731
                    got = loss_and_grads(fn, img, txt, 20.0, -3.0)
                else:
                    fn = lambda i, t, s: clip_loss(i, t, s, **kwargs)  # noqa: E731
                    got = loss_and_grads(fn, img, txt, 20.0)
                where = f"rank {rank}, {'siglip' if siglip else 'clip'}, impl={impl}"
                # per rank: loss and feature gradients equal open_clip's distributed loss
                for name, g, w in zip(["loss", "d_img", "d_txt"], got[:3], open_clip_rank[:3]):
                    error = relative_error(g, w, torch.float32)
                    assert error <= TOLERANCE[torch.float32], f"{where}: {name} off by {error:.1e}"
                # mean over ranks (what DDP applies): the single-process loss of the global batch
                global_pairs = [("loss", got[0], single[0]), ("d_img", got[1], single[1][mine]),
                                ("d_txt", got[2], single[2][mine]), ("d_scale", got[3], single[3])]
                if siglip:
                    global_pairs.append(("d_bias", got[4], single[4]))
                for name, g, w in global_pairs:
                    if name in ("loss", "d_scale", "d_bias"):
                        g = g.clone()
                        torch.distributed.all_reduce(g)
                        g /= WORLD_SIZE
                    else:
                        g = g / WORLD_SIZE  # each rank holds W x its share of the global gradient
                    error = relative_error(g, w, torch.float32)
                    assert error <= TOLERANCE[torch.float32], f"{where}: {name} off by {error:.1e}"
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_matches_open_clip_and_the_global_batch():
    from tests.realarch import free_port, run_forked_ranks

    run_forked_ranks(_distributed_worker, (free_port(),), nprocs=WORLD_SIZE)
