"""common/clip_score.py: the metrics' constants by hand, model loading, the command line."""

import functools
import importlib
import json
import time
import weakref

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from common.clip_score import (CLIP_S_WEIGHT, PAC_S_WEIGHT, PREFIX, ScorerLoadError, clip_s, encode_texts, load_clip_as,
                               harmonic_mean, load_clip, load_pacs_state_dict, main, pac_s, ref_clip_s, ref_pac_s,
                               ref_similarity, score_from_features)
from common.data import write_manifest
from common.miniature import WorldConfig, write_world
from tests.realarch import serve_open_clip_tag

MICRO = "micro-ViT-16"


def test_constants_are_the_references():
    assert (CLIP_S_WEIGHT, PAC_S_WEIGHT, PREFIX) == (2.5, 2.0, "A photo depicts ")


def test_scores_by_hand():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cand = np.array([[0.6, 0.8], [-0.6, 0.8], [0.0, 1.0]])
    # CLIP-S = 2.5 * max(cos, 0): 2.5 * 0.6, clamped to 0, 2.5 * 1
    np.testing.assert_allclose(score_from_features(img, cand, 2.5), [1.5, 0.0, 2.5])
    np.testing.assert_allclose(score_from_features(img, cand, 2.0), [1.2, 0.0, 2.0])
    refs = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0]]), np.array([[0.0, -1.0]])]
    # r = max over references, not clamped: max(0.6, 0.8), -0.6, -1.0
    ref_sim = ref_similarity(cand, refs)
    np.testing.assert_allclose(ref_sim, [0.8, -0.6, -1.0])
    # RefCLIP-S = 2 * s * r / (s + r): 2 * 1.5 * 0.8 / 2.3; 0 where s = 0; 2 * 2.5 * -1 / 1.5
    np.testing.assert_allclose(harmonic_mean(score_from_features(img, cand, 2.5), ref_sim),
                               [2.4 / 2.3, 0.0, -5.0 / 1.5])
    assert harmonic_mean(np.array([0.0]), np.array([0.0]))[0] == 0.0  # the references' 0/0 NaN, defined


@pytest.fixture(scope="module")
def micro_bundle():
    torch.manual_seed(0)
    return load_clip(MICRO, device="cpu")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return write_world(WorldConfig(n_train=8, n_val=2, n_test=6), tmp_path_factory.mktemp("world") / "w")


def test_end_to_end_metrics_use_prefix_clamp_and_harmonic_mean(micro_bundle, tiny_world):
    from common.data import read_manifest

    records = read_manifest(tiny_world / "test.jsonl")
    images = [tiny_world / r["image"] for r in records]
    candidates = [r["synthetic_caption"] for r in records]
    refs = [[r["caption"], r["fused"]] for r in records]
    model, tokenizer = micro_bundle.model, micro_bundle.tokenizer
    with torch.no_grad():
        pixels = torch.stack([micro_bundle.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                              for p in images])
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        cand = torch.nn.functional.normalize(model.encode_text(tokenizer([PREFIX + c for c in candidates])),
                                             dim=-1).numpy()
        ref = [torch.nn.functional.normalize(model.encode_text(tokenizer([PREFIX + t for t in group])), dim=-1).numpy()
               for group in refs]
    cos = (img * cand).sum(1)
    expected_clip = 2.5 * np.maximum(cos, 0)
    result = clip_s(micro_bundle, images, candidates, progress=False)
    np.testing.assert_allclose(result["per_sample"], expected_clip, rtol=1e-5, atol=1e-6)
    assert result["mean"] == pytest.approx(expected_clip.mean(), rel=1e-5)
    np.testing.assert_allclose(pac_s(micro_bundle, images, candidates, progress=False)["per_sample"],
                               2.0 * np.maximum(cos, 0), rtol=1e-5, atol=1e-6)
    r = np.array([max(float(g @ c) for g in group) for c, group in zip(cand, ref)])
    expected_ref = np.where(expected_clip + r == 0, 0,
                            2 * expected_clip * r / np.where(expected_clip + r == 0, 1, expected_clip + r))
    np.testing.assert_allclose(ref_clip_s(micro_bundle, images, candidates, refs, progress=False)["per_sample"],
                               expected_ref, rtol=1e-4, atol=1e-6)
    ref_pac = ref_pac_s(micro_bundle, images, candidates, refs, progress=False)
    np.testing.assert_allclose(ref_pac["score"]["per_sample"], 2.0 * np.maximum(cos, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        clip_s(micro_bundle, images[:2], ["ok", " "], progress=False)
    with pytest.raises(ValueError, match="one candidate per image"):
        clip_s(micro_bundle, images, candidates[:-1], progress=False)
    for group in ("a dog on a road.", ["a dog.", None], []):  # a string was scored character by character
        with pytest.raises(ValueError, match="sample 1: references must be a non-empty list of non-empty strings"):
            ref_clip_s(micro_bundle, images[:2], candidates[:2], [refs[0], group], progress=False)


def test_local_checkpoint_loads(micro_bundle, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": micro_bundle.model.state_dict()}, path)
    loaded = load_clip(MICRO, pretrained=str(path), device="cpu")
    for (name, a), b in zip(micro_bundle.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    texts = ["a red circle on grass."]
    np.testing.assert_allclose(encode_texts(loaded, texts, progress=False),
                               encode_texts(micro_bundle, texts, progress=False))


def test_pacs_state_dict_loader(micro_bundle, tmp_path):
    # PAC-S ships {"state_dict": ...} in OpenAI CLIP names, saved from a DataParallel model
    state = {"module." + k: v.clone() + 1.0 for k, v in micro_bundle.model.state_dict().items()}
    path = tmp_path / "clip_ViT-B-32.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    fresh = load_clip(MICRO, device="cpu").model
    load_pacs_state_dict(fresh, path)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state["module." + key]), key
    torch.save({"state_dict": {"visual.wrong.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ScorerLoadError, match="does not match the model"):
        load_pacs_state_dict(fresh, tmp_path / "bad.pth")
    state["module.positional_embedding"] = torch.zeros(77, 32)  # every name right, one shape of another architecture
    torch.save({"state_dict": state}, tmp_path / "other.pth")
    with pytest.raises(ScorerLoadError, match=r"other shapes \['positional_embedding'\]"):
        load_pacs_state_dict(fresh, tmp_path / "other.pth")
    with pytest.raises(ScorerLoadError, match="pacs_checkpoint=.*absent.pth not found"):
        load_pacs_state_dict(fresh, tmp_path / "absent.pth")


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, whatever the machine's cache holds."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def hub_http():
    """The HTTP library huggingface_hub is built on: httpx for huggingface_hub 1.x, httpx2 for 2.x."""
    from huggingface_hub.utils import _http

    return importlib.import_module(type(_http.get_session()).__module__.partition(".")[0])


def hub_answers(monkeypatch, handler):
    """Every request huggingface_hub makes goes to `handler` (an httpx transport in the test), never the network."""
    from huggingface_hub.utils import _http

    http = hub_http()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", lambda: http.Client(transport=http.MockTransport(handler)))
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)


def test_load_errors_name_the_argument(tmp_path, empty_hf_cache):
    with pytest.raises(ScorerLoadError, match="pretrained=.* is neither a file nor an open_clip tag of micro-ViT-16"):
        load_clip(MICRO, pretrained=str(tmp_path / "absent.pt"), device="cpu")
    start = time.perf_counter()
    with pytest.raises(ScorerLoadError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set.*pretrained="):
        load_clip("ViT-B-32", pretrained="openai", device="cpu")
    assert time.perf_counter() - start < 2
    with pytest.raises(ScorerLoadError, match="unknown open_clip architecture"):
        load_clip("no-such-model", device="cpu")


def test_uncached_weights_without_a_network_fail_at_once(empty_hf_cache, monkeypatch):
    """No HF_HUB_OFFLINE and no network: one failed request, not huggingface_hub's ~50 s of retries."""
    http = hub_http()

    def no_network(request):
        raise http.ConnectError("[Errno -2] Name or service not known", request=request)

    hub_answers(monkeypatch, no_network)
    start = time.perf_counter()
    with pytest.raises(ScorerLoadError, match="Hugging Face Hub cannot be reached.*pretrained="):
        load_clip("ViT-B-32", pretrained="openai", device="cpu")
    assert time.perf_counter() - start < 2


def test_uncached_weights_are_downloaded_when_the_hub_answers(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai")
    served, asked = open_clip.pretrained.hf_hub_download, []

    def download(repo_id, filename, local_files_only=False, **kwargs):  # a cache that starts empty
        asked.append((filename, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError(f"{filename} not cached")
        return served(repo_id, filename, **kwargs)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
    hub_answers(monkeypatch, lambda request: hub_http().Response(200))
    bundle = load_clip("ViT-B-32", pretrained="openai", device="cpu")
    assert asked == [("open_clip_model.safetensors", True), ("open_clip_pytorch_model.bin", True),
                     ("open_clip_model.safetensors", False)]  # the cache first, then the download open_clip makes
    for key, value in reference.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value), key

    def missing(repo_id, filename, local_files_only=False, **kwargs):
        raise LocalEntryNotFoundError("not cached") if local_files_only else FileNotFoundError("404 (test)")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", missing)
    with pytest.raises(ScorerLoadError, match="could not download.*404.*pretrained="):
        load_clip("ViT-B-32", pretrained="openai", device="cpu")


def test_command_line_expected_errors_are_one_line_and_exit_status_1(micro_bundle, tiny_world, tmp_path, monkeypatch,
                                                                     empty_hf_cache):
    from common.data import read_manifest

    rows = [{**{k: v for k, v in r.items() if k != "_root"}, "image": str(tiny_world / r["image"])}
            for r in read_manifest(tiny_world / "test.jsonl")]
    good = write_manifest(tmp_path / "m.jsonl", rows)
    write_manifest(tmp_path / "missing_image.jsonl", [rows[0], {**rows[1], "image": str(tmp_path / "gone.png")}])
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    torch.save(open_clip.create_model("mini-ViT-8").state_dict(), tmp_path / "mini.pt")  # text width 96, not 32
    torch.save({"state_dict": micro_bundle.model.state_dict()}, tmp_path / "micro_pacs.pth")
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32")  # tiny config, no weights: the PAC-S case's model
    cases = {  # argv -> words the one line must hold
        "missing manifest": (["--manifest", str(tmp_path / "absent.jsonl")], ["manifest not found", "absent.jsonl"]),
        "malformed manifest": (["--manifest", str(tmp_path / "broken.jsonl")], ["broken.jsonl:2: not valid JSON"]),
        "strict, missing image": (["--manifest", str(tmp_path / "missing_image.jsonl"), "--model", MICRO, "--strict"],
                                  ["missing_image.jsonl:2", "image file not found", "gone.png"]),
        "no sample left": (["--manifest", str(tmp_path / "missing_image.jsonl"), "--model", MICRO, "--text-field",
                            "no_such_field"], ["no sample could be scored (2 skipped)"]),
        "checkpoint of another architecture": (
            ["--manifest", str(good), "--model", MICRO, "--pretrained", str(tmp_path / "mini.pt")],
            ["mini.pt", "micro-ViT-16", "another architecture", "--pretrained"]),
        "PAC-S checkpoint of another architecture": (
            ["--manifest", str(good), "--model", "ViT-B-32", "--pacs-checkpoint", str(tmp_path / "micro_pacs.pth")],
            ["micro_pacs.pth", "another architecture", "--pacs-checkpoint"]),
        "weights not cached, offline": (["--manifest", str(good), "--model", "ViT-L-14", "--pretrained", "openai"],
                                        ["HF_HUB_OFFLINE", "--pretrained"]),
    }
    for name, (argv, words) in cases.items():
        try:
            main(["--text-field", "synthetic_caption", "--device", "cpu", "--out", str(tmp_path / "s.json"), *argv])
        except SystemExit as exit_:
            message = exit_.code  # SystemExit(str): Python prints it to stderr and exits with status 1
        else:
            pytest.fail(f"{name}: no error")
        assert isinstance(message, str) and "\n" not in message, (name, message)
        assert all(word in message for word in words), (name, message)
        assert message.endswith("--debug shows the traceback)"), (name, message)


def test_device_cuda_without_cuda_says_so_and_debug_keeps_the_traceback(tiny_world, tmp_path, monkeypatch):
    """--device cuda on a machine without CUDA blamed --pretrained (the weights' loader failed first); with --debug
    the expected error is raised as itself."""
    from common.data import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--manifest", str(tiny_world / "test.jsonl"), "--model", MICRO, "--device", "cuda",
            "--out", str(tmp_path / "s.json")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert str(exit_.value.code).startswith("error: --device cuda: CUDA is not available on this machine")
    with pytest.raises(DeviceError, match="^--device cuda: CUDA is not available"):
        main([*argv, "--debug"])
    assert not (tmp_path / "s.json").exists()


def test_load_clip_as_names_the_callers_flag(tmp_path):
    """A paper file's scorer flags are not load_clip's argument names (dico's --encoder-pretrained)."""
    missing = str(tmp_path / "enc.pt")
    with pytest.raises(ScorerLoadError,
                       match=rf"^--encoder-pretrained: pretrained='{missing}' is neither a file") as err:
        load_clip_as({"pretrained": "--encoder-pretrained"}, MICRO, missing, "cpu")
    assert err.value.argument == "pretrained"
    with pytest.raises(ScorerLoadError, match="^--model: unknown open_clip architecture 'micro-ViT-99'"):
        load_clip_as({"pretrained": "--encoder-pretrained"}, "micro-ViT-99", None, "cpu")


def test_command_line_scores_a_manifest_and_counts_bad_samples(micro_bundle, tiny_world, tmp_path):
    from common.data import read_manifest

    ckpt = tmp_path / "ckpt.pt"
    torch.save(micro_bundle.model.state_dict(), ckpt)
    records = read_manifest(tiny_world / "test.jsonl")
    for r in records:
        r["refs"] = [r["caption"], r["fused"]]
        r["image"] = str(tiny_world / r["image"])
    records[2]["image"] = str(tmp_path / "missing.png")
    records[4]["synthetic_caption"] = ""
    write_manifest(tmp_path / "m.jsonl", records)
    argv = ["--manifest", str(tmp_path / "m.jsonl"), "--text-field", "synthetic_caption", "--refs-field", "refs",
            "--model", MICRO, "--pretrained", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "s.json")]
    report = main(argv)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["means"] == report["means"] and set(saved["means"]) == {"CLIP-S", "RefCLIP-S"}
    assert saved["skipped"]["count"] == 2 and len(saved["ids"]) == 4
    assert {sample for sample, _ in saved["skipped"]["examples"]} == {records[2]["id"], records[4]["id"]}
    kept = [r for i, r in enumerate(records) if i not in (2, 4)]
    direct = clip_s(micro_bundle, [r["image"] for r in kept], [r["synthetic_caption"] for r in kept], progress=False)
    np.testing.assert_allclose(saved["per_sample"]["CLIP-S"], direct["per_sample"], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit, match="m.jsonl:3 .*image file not found"):
        main(argv + ["--strict"])


BAD_FIELDS = {  # field -> a value of the wrong type, and a word the skip reason must contain
    "refs as a string": ("refs", "a dog on a road.", "list"),  # once scored character by character
    "null reference": ("refs", ["a dog on a road.", None], "reference"),
    "empty reference": ("refs", ["a dog on a road.", " "], "reference"),
    "image as a number": ("image", 7, "image"),
    "image as a list": ("image", ["a.png"], "image"),
    "caption as a list": ("synthetic_caption", ["a dog.", "a cat."], "synthetic_caption"),
}


def test_fields_of_the_wrong_type_are_counted_skips_or_a_strict_error_naming_file_line_and_id(micro_bundle, tiny_world,
                                                                                                 tmp_path):
    from common.clip_score import Args, score_manifest
    from common.data import BadSampleError, read_manifest

    ckpt = tmp_path / "ckpt.pt"
    torch.save(micro_bundle.model.state_dict(), ckpt)
    good = [{**{k: v for k, v in r.items() if k != "_root"}, "image": str(tiny_world / r["image"]),
             "refs": [r["caption"], r["fused"]]} for r in read_manifest(tiny_world / "test.jsonl")]
    bad = [{**good[i % len(good)], "id": f"bad-{i}", field: value}
           for i, (field, value, _) in enumerate(BAD_FIELDS.values())]
    write_manifest(tmp_path / "m.jsonl", good[:3] + bad + good[3:])

    def args(manifest, **kw):
        return Args(manifest=str(manifest), text_field="synthetic_caption", refs_field="refs", model=MICRO,
                    pretrained=str(ckpt), device="cpu", out=str(tmp_path / "s.json"), **kw)

    report = score_manifest(args(tmp_path / "m.jsonl"))
    assert report["ids"] == [r["id"] for r in good] and report["skipped"]["count"] == len(bad)
    reasons = dict(report["skipped"]["examples"])
    for i, (field, _, word) in enumerate(BAD_FIELDS.values()):
        assert field in reasons[f"bad-{i}"] and word in reasons[f"bad-{i}"], reasons[f"bad-{i}"]
    direct = ref_clip_s(micro_bundle, [r["image"] for r in good], [r["synthetic_caption"] for r in good],
                        [r["refs"] for r in good], progress=False)
    np.testing.assert_allclose(report["per_sample"]["RefCLIP-S"], direct["per_sample"], rtol=1e-4, atol=1e-6)
    for i, name in enumerate(BAD_FIELDS):  # strict: the first bad sample stops the job, named by file, line and id
        (tmp_path / "one.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in good[:2] + [bad[i]]))
        with pytest.raises(BadSampleError, match=rf"one\.jsonl:4 \(id 'bad-{i}'\)"):
            score_manifest(args(tmp_path / "one.jsonl", strict=True))


def test_a_chunk_holds_tensors_not_decoded_images(micro_bundle, tiny_world, tmp_path, monkeypatch):
    """Memory: each image is preprocessed as it is opened, so the decoded images alive at once do not grow with the
    number of samples (a 12-megapixel image held is ~47 MB; README's "Scoring captions" has the measured RSS)."""
    from common.clip_score import Args, score_manifest
    from common.data import read_manifest

    live, peak, init = set(), [0], Image.Image.__init__

    def counted_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live.add(id(self))
        peak[0] = max(peak[0], len(live))
        weakref.finalize(self, live.discard, id(self))

    torch.save(micro_bundle.model.state_dict(), tmp_path / "ckpt.pt")
    rows = [{**{k: v for k, v in r.items() if k != "_root"}, "image": str(tiny_world / r["image"])}
            for r in read_manifest(tiny_world / "test.jsonl")]
    monkeypatch.setattr(Image.Image, "__init__", counted_init)
    peaks = []
    for n in (2, len(rows)):
        write_manifest(tmp_path / f"m{n}.jsonl", rows[:n])
        report = score_manifest(Args(manifest=str(tmp_path / f"m{n}.jsonl"), text_field="synthetic_caption",
                                     model=MICRO, pretrained=str(tmp_path / "ckpt.pt"), device="cpu",
                                     out=str(tmp_path / "s.json")))
        assert len(report["ids"]) == n
        peaks.append(peak[0])
        peak[0] = 0
    assert peaks[0] == peaks[1] > 0, peaks

# ---------------------------------------------------------------------------------------------
# Real-architecture tier: the README's two commands with ViT-B-32 at tiny width, offline
# ---------------------------------------------------------------------------------------------


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A non-square RGB test image with smooth gradients and sharp blocks (resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    pixels = np.stack([xs * 255 / w, ys * 255 / h, np.full((h, w), 40.0 * seed % 255)], axis=-1)
    for _ in range(6):
        x, y = rng.integers(0, w - 40), rng.integers(0, h - 40)
        pixels[y:y + 40, x:x + 40] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def tag_transform(name: str, tag: str):
    """The reference preprocessing written out from the tag's settings and the architecture's image size."""
    from torchvision import transforms as T

    cfg = open_clip.get_pretrained_cfg(name, tag)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[cfg["interpolation"]]
    resize = ([T.Resize(size, interpolation=mode), T.CenterCrop(size)] if cfg["resize_mode"] == "shortest"
              else [T.Resize((size, size), interpolation=mode)])  # "squash"
    # clipscore and open_clip convert to RGB after the crop (an RGBA or palette image is resized as decoded)
    return T.Compose([*resize, lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


@functools.cache
def bpe_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")  # every architecture here: OpenAI's BPE, context 77


def reference_features(model, pixels: torch.Tensor, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and PREFIX + text features of a reference model."""
    tokenizer = bpe_tokenizer()
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([PREFIX + t for t in texts])), dim=-1)
    return img.numpy(), txt.numpy()


WORDS = "red blue green dog cat road table sky tree car man woman child ball kite bird horse boat water snow".split()
CAPTION_POOL = [" ".join(np.random.default_rng(i).choice(WORDS, size=1 + i % 7)) for i in range(64)]
SEED = 2  # random tiny ViT-B-32 weights under which some pool captions score clearly above 0 (see positive_captions)


def positive_captions(model, pixels: torch.Tensor) -> list[str]:
    """For each image the pool caption the reference scores highest: clearly above 0, so the clamp hides nothing."""
    img, txt = reference_features(model, pixels, CAPTION_POOL)
    best = (img @ txt.T).argmax(1)
    assert np.all((img @ txt.T).max(1) > 0.05), "random weights gave no caption a positive cosine; change SEED"
    return [CAPTION_POOL[i] for i in best]


def real_manifest(tmp_path, images: list[Image.Image], captions: list[str], refs: list[list[str]]):
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        image.save(paths[-1])
    rows = [{"id": f"s{i}", "image": f"img{i}.png", "caption": c, "refs": r}
            for i, (c, r) in enumerate(zip(captions, refs))]
    return write_manifest(tmp_path / "coco_test.jsonl", rows), paths


def expected_scores(model, pixels, captions, refs, w):
    img, cand = reference_features(model, pixels, captions)
    score = w * np.maximum((img * cand).sum(1), 0)
    r = np.array([(reference_features(model, pixels[:1], group)[1] @ c).max() for c, group in zip(cand, refs)])
    return score, 2 * score * r / (score + r)


def uses_quick_gelu(model) -> bool:
    return any(isinstance(module, open_clip.transformer.QuickGELU) for module in model.modules())


def test_readme_clip_s_command_on_vit_b32_openai_scores_with_quick_gelu(tmp_path, monkeypatch):
    """`--model ViT-B-32 --pretrained openai`: the OpenAI weights need QuickGELU (open_clip only warns)."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai", seed=SEED)
    assert uses_quick_gelu(reference)
    images = [photo(seed) for seed in range(3)]
    pixels = torch.stack([tag_transform("ViT-B-32", "openai")(image) for image in images])
    captions = positive_captions(reference, pixels)
    refs = [[CAPTION_POOL[0], CAPTION_POOL[5]], [CAPTION_POOL[3]], [captions[2], CAPTION_POOL[1]]]
    manifest, _ = real_manifest(tmp_path, images, captions, refs)
    report = main(["--manifest", str(manifest), "--text-field", "caption", "--refs-field", "refs",
                   "--model", "ViT-B-32", "--pretrained", "openai", "--device", "cpu",
                   "--out", str(tmp_path / "scores.json")])
    score, ref_score = expected_scores(reference, pixels, captions, refs, CLIP_S_WEIGHT)
    assert report["ids"] == ["s0", "s1", "s2"]
    np.testing.assert_allclose(report["per_sample"]["CLIP-S"], score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(report["per_sample"]["RefCLIP-S"], ref_score, rtol=1e-4, atol=1e-5)


def test_readme_pac_s_command_loads_the_state_dict_into_quick_gelu_vit_b32(tmp_path, monkeypatch):
    """`--model ViT-B-32 --pacs-checkpoint clip_ViT-B-32.pth`: every weight from the file, QuickGELU, w = 2.0."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai", seed=SEED)
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}, "epoch": 5},
               tmp_path / "clip_ViT-B-32.pth")
    images = [photo(seed) for seed in (4, 5)]
    pixels = torch.stack([tag_transform("ViT-B-32", "openai")(image) for image in images])
    captions = positive_captions(reference, pixels)
    refs = [[CAPTION_POOL[2]], [captions[1], CAPTION_POOL[7]]]
    manifest, _ = real_manifest(tmp_path, images, captions, refs)
    report = main(["--manifest", str(manifest), "--text-field", "caption", "--refs-field", "refs",
                   "--model", "ViT-B-32", "--pacs-checkpoint", str(tmp_path / "clip_ViT-B-32.pth"), "--device", "cpu",
                   "--out", str(tmp_path / "scores.json")])
    score, ref_score = expected_scores(reference, pixels, captions, refs, PAC_S_WEIGHT)
    np.testing.assert_allclose(report["per_sample"]["PAC-S"], score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(report["per_sample"]["RefPAC-S"], ref_score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, tag", [("ViT-B-32", "openai"),  # QuickGELU, OpenAI mean/std
                                       ("ViT-L-14", "laion2b_s32b_b82k"),  # GELU, mean = std = 0.5
                                       ("ViT-H-14", "dfn5b")])  # QuickGELU, squash resize
def test_a_tag_gets_its_own_activation_and_preprocessing(tmp_path, monkeypatch, name, tag):
    serve_open_clip_tag(monkeypatch, tmp_path, name, tag)
    bundle = load_clip(name, tag, device="cpu")
    assert uses_quick_gelu(bundle.model) == bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
    image = photo(1, size=(300, 180))
    torch.testing.assert_close(bundle.preprocess(image), tag_transform(name, tag)(image), rtol=0, atol=1e-6)


def test_rgba_and_palette_images_reach_the_preprocess_as_decoded(tmp_path, monkeypatch):
    """open_clip's preprocess (and clipscore's) converts to RGB after resize and crop: an RGBA image is resized with its
    alpha, a palette image with the palette's nearest-neighbour rule. Converting first gives other pixels."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai", seed=SEED)
    rgba = photo(6).convert("RGBA")
    alpha = np.clip(np.linspace(-255, 510, 320), 0, 255)  # transparent left third (colours under alpha 0)
    rgba.putalpha(Image.fromarray(np.tile(alpha, (240, 1)).astype(np.uint8)))
    rng = np.random.default_rng(7)
    palette = Image.fromarray(rng.integers(0, 16, (720, 960), dtype=np.uint8), mode="P")  # noise: nearest != bicubic
    palette.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tolist())
    images = [rgba, palette]
    assert [image.mode for image in images] == ["RGBA", "P"]
    manifest, paths = real_manifest(tmp_path, images, ["x", "x"], [["x"], ["x"]])
    transform = tag_transform("ViT-B-32", "openai")
    pixels = torch.stack([transform(Image.open(path)) for path in paths])
    captions = positive_captions(reference, pixels)
    manifest, paths = real_manifest(tmp_path, images, captions, [["x"], ["x"]])
    expected, _ = expected_scores(reference, pixels, captions, [["x"], ["x"]], CLIP_S_WEIGHT)
    converted = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    wrong, _ = expected_scores(reference, converted, captions, [["x"], ["x"]], CLIP_S_WEIGHT)
    assert np.all(np.abs(wrong - expected) > 10 * (1e-5 + 1e-4 * expected))  # the tolerances below tell them apart
    report = main(["--manifest", str(manifest), "--text-field", "caption", "--model", "ViT-B-32", "--pretrained",
                   "openai", "--device", "cpu", "--out", str(tmp_path / "scores.json")])
    np.testing.assert_allclose(report["per_sample"]["CLIP-S"], expected, rtol=1e-4, atol=1e-5)
    bundle = load_clip("ViT-B-32", "openai", device="cpu")
    for source in (paths, [path.read_bytes() for path in paths], [Image.open(path) for path in paths]):
        np.testing.assert_allclose(clip_s(bundle, source, captions, progress=False)["per_sample"], expected,
                                   rtol=1e-4, atol=1e-5)


def test_the_file_copied_alone_into_another_project_scores_images(tmp_path, monkeypatch):
    """common/clip_score.py copied into a fresh folder, with no common/ package importable: the library scores
    (the tag's settings included); the command line, which reads manifests with common/data.py, says so."""
    import importlib.util
    import shutil
    import sys

    from common import clip_score as repo_module

    project = tmp_path / "other_project"
    project.mkdir()
    shutil.copy(repo_module.__file__, project / "clip_score.py")
    monkeypatch.chdir(project)
    for name in ("common", "common.data", "common.clip_train", "common.miniature"):
        monkeypatch.setitem(sys.modules, name, None)  # `import common...` now fails as in another project
    spec = importlib.util.spec_from_file_location("clip_score", project / "clip_score.py")
    copied = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "clip_score", copied)  # as `import clip_score` would
    spec.loader.exec_module(copied)

    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai", seed=SEED)
    images = [photo(seed) for seed in (8, 9)]
    pixels = torch.stack([tag_transform("ViT-B-32", "openai")(image) for image in images])
    captions = positive_captions(reference, pixels)
    expected, _ = expected_scores(reference, pixels, captions, [["x"], ["x"]], CLIP_S_WEIGHT)
    bundle = copied.load_clip("ViT-B-32", "openai", device="cpu")
    assert uses_quick_gelu(bundle.model)
    np.testing.assert_allclose(copied.clip_s(bundle, images, captions, progress=False)["per_sample"], expected,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(copied.BadSampleError, match="image file not found: missing.png"):
        copied.clip_s(bundle, ["missing.png"], ["a caption"], progress=False)
    with pytest.raises(copied.ScorerLoadError, match="unknown open_clip architecture 'mini-ViT-99'") as err:
        copied.load_clip("mini-ViT-99", None, device="cpu")
    assert err.value.argument == "model"
    with pytest.raises(SystemExit, match="reads manifests with common/data.py"):
        copied.main(["--manifest", "m.jsonl", "--model", "ViT-B-32", "--pretrained", "openai"])


def test_a_16_bit_png_scores_as_its_8_bit_copy(micro_bundle, tmp_path):
    """PIL's convert("RGB") in the preprocess clipped a 16-bit PNG to white, changing its score."""
    from common.clip_score import image_pixels

    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    Image.fromarray((gradient >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # Pillow 10.0 (the lowest allowed) opens it as I
    sixteen, eight = (image_pixels(micro_bundle, tmp_path / name) for name in ("g16.png", "g8.png"))
    assert torch.allclose(sixteen, eight, atol=0.05)  # within one grey level after CLIP's normalisation
    floats = Image.fromarray(gradient.astype(np.float32) / 65535)  # mode F, in 0..1
    assert torch.allclose(image_pixels(micro_bundle, floats), eight, atol=0.05)
