"""The fast input pipeline (maecore.data.crop.FastRandomResizedCrop, ``--decode fast``) against the official one
(torchvision RandomResizedCrop(0.2-1, bicubic) + flip + ToTensor + Normalize): the same crop boxes and flips under
the same RNG, the same distribution over many draws (both also for the classification probe's 0.08-1 crops),
bitwise-equal pixels where no DCT reduction happens (Pillow resize) and the output statistics within stated
tolerances elsewhere; skip-and-count of bad files; the GPU path's worker half and its device half (run on the CPU
here; tests/data/test_fastdata.py::test_gpu_decode_on_cuda on a GPU); the ``--bench data`` smoke run.

Tolerances (in 0-255 pixel units, per channel, paired crops: same seeds, so the same boxes):
* DCT scale 1, ``resize="pil"``: bitwise equal;
* DCT scale 1, ``resize="torch"`` (the default): mean of a crop within 0.05, its std within 0.5 %;
* DCT scale 2/4/8 (1600x1200 photos): mean over all crops within 0.1 and std within 1 %; per crop, mean within
  1.0 and std within 2 %.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from classification.data import linprobe_train, linprobe_transform
from maecore.data.crop import CropPlan, FastRandomResizedCrop, dct_scale
from maecore.data.decode import crop_decoder
from maecore.data.gpu import EncodedBatch, GpuDecode, GpuJpegCrop, collate_encoded
from maecore.data.images import ImageFiles
from maecore.data.packed.reader import PackedImages
from maecore.data.packed.writer import pack
from maecore.data.pixels import UInt8Normalize, normalize_uint8
from maecore.data.sampler import SeededDataset
from pretrain.data import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_SCALE, build_pretrain_dataset, pretrain_transform

CUDA = torch.cuda.is_available()
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """scikit-image's astronaut, coffee and chelsea as q90 JPEGs at 500x375 and 1600x1200, plus the 500x375
    set packed."""
    from skimage import data as skd

    root = tmp_path_factory.mktemp("photos")
    out = {}
    for w, h in ((500, 375), (1600, 1200)):
        d = root / f"{w}x{h}"
        d.mkdir()
        for name in ("astronaut", "coffee", "chelsea"):
            Image.fromarray(getattr(skd, name)()).resize((w, h), Image.Resampling.BICUBIC).save(d / f"{name}.jpg", quality=90)
        out[f"{w}x{h}"] = d
    out["packed"] = pack(out["500x375"], root / "packed", say=lambda _m: None)[0]
    return out


def corrupt_folder(photos: dict[str, Path], tmp_path: Path) -> Path:
    """The 500x375 photos beside a truncated JPEG and a text file named .jpg."""
    d = tmp_path / "bad"
    d.mkdir()
    good = sorted(photos["500x375"].glob("*.jpg"))
    for i, p in enumerate(good):
        (d / f"{i}_ok.jpg").write_bytes(p.read_bytes())
    (d / "0_trunc.jpg").write_bytes(good[0].read_bytes()[:5000])
    (d / "1_text.jpg").write_text("not an image")
    return d


def official_pixels(x: torch.Tensor) -> torch.Tensor:
    """The official pipeline's normalised floats back in 0-255 units."""
    return (x * STD + MEAN) * 255


def keys(n: int, m: int) -> list[tuple[int, int]]:
    return [(i % m, 7919 * i + 1) for i in range(n)]


# per training CLI: its fast decoder as the CLI builds it, its official transform's RandomResizedCrop, and the
# torchvision RandomResizedCrop arguments of the official script (main_linprobe: the default scale, 0.08-1)
PIPELINES = {
    "pretrain": (lambda: crop_decoder("fast", 224, PRETRAIN_SCALE), lambda: pretrain_transform(224).transforms[0], {"scale": (0.2, 1.0)}),
    "linprobe": (lambda: linprobe_train(224, "fast")[1], lambda: linprobe_transform(224).transforms[0], {}),
}


# ---- crop boxes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_boxes_and_flips_are_the_official_ones_under_the_same_rng(pipeline):
    """The same torch RNG calls as RandomResizedCrop + RandomHorizontalFlip: same box, same flip, and the RNG left
    in the same state (the next draw agrees), for landscape, portrait, tiny and extreme shapes (the fallback)."""
    make_fast, make_rrc, _ = PIPELINES[pipeline]
    fast, rrc = make_fast(), make_rrc()
    assert isinstance(fast, FastRandomResizedCrop) and isinstance(rrc, T.RandomResizedCrop) and fast.scale == rrc.scale
    for size in ((500, 375), (375, 500), (1600, 1200), (32, 32), (2000, 100)):
        im = Image.new("RGB", size)
        for seed in range(60):
            torch.manual_seed(seed)
            box = rrc.get_params(im, rrc.scale, rrc.ratio)
            flip = bool(torch.rand(1) < 0.5)
            after = torch.rand(1)
            torch.manual_seed(seed)
            assert fast.plan(im) == CropPlan(*box, flip)
            assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_box_distribution_matches_torchvision_over_many_draws(pipeline):
    """Scale and log-aspect of 3000 boxes drawn the fast way under the sampler's per-sample seeds vs 3000 from
    torchvision's RandomResizedCrop (the official script's arguments) under a different stream: two-sample KS
    p > 0.001, flip rate 0.5 +- 0.04."""
    from scipy.stats import ks_2samp

    make_fast, _, official = PIPELINES[pipeline]
    im = Image.new("RGB", (500, 375))
    fast = make_fast()
    rrc = T.RandomResizedCrop(224, **official)
    ours, theirs, flips = [], [], []
    for i in range(3000):
        torch.default_generator.manual_seed((12345 * 1_000_003 + i) * 10_000_019 % (2**63 - 1))
        p = fast.plan(im)
        ours.append((p.width * p.height / (500 * 375), np.log(p.width / p.height)))
        flips.append(p.flip)
    torch.manual_seed(999)
    for _ in range(3000):
        i, j, h, w = rrc.get_params(im, rrc.scale, rrc.ratio)
        theirs.append((w * h / (500 * 375), np.log(w / h)))
    ours_a, theirs_a = np.array(ours), np.array(theirs)
    for k in range(2):
        assert ks_2samp(ours_a[:, k], theirs_a[:, k]).pvalue > 1e-3
    assert rrc.scale[0] - 1e-3 < ours_a[:, 0].min() and ours_a[:, 0].max() <= 1.0
    assert abs(np.mean(flips) - 0.5) < 0.04


def test_dct_scale_never_decodes_below_the_output(photos, monkeypatch):
    """The DCT scale is the largest of 8/4/2 that keeps the crop at least the output size; on 1600x1200 photos
    Pillow's draft is asked for it and the reduced crop still covers the output."""
    assert dct_scale((447, 1000), (224, 224)) == 1 and dct_scale((448, 448), (224, 224)) == 2
    assert dct_scale((900, 1000), (224, 224)) == 4 and dct_scale((1792, 1792), (224, 224)) == 8
    from PIL import JpegImagePlugin

    seen = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        got = real(self, mode, size)
        seen.append((self.size, got))
        return got

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for out in (224, 112):  # 112 reaches scale 8 on 1600x1200
        fast = FastRandomResizedCrop(out)
        for i, seed in keys(30, 3):
            seen.clear()
            torch.default_generator.manual_seed(seed)
            path = sorted(photos["1600x1200"].glob("*.jpg"))[i]
            with Image.open(path) as im:
                plan = fast.plan(im)
            s = dct_scale((plan.width, plan.height), (out, out))
            assert plan.width / s >= out and plan.height / s >= out
            torch.default_generator.manual_seed(seed)
            x = fast(path)
            assert x.shape == (3, out, out) and x.dtype == torch.uint8
            if s == 1:
                assert not seen
            else:
                (size, (_, box)), = seen
                assert round(1600 / box[2]) == s and size == (-(-1600 // s), -(-1200 // s))
    assert {round(1600 / b[2]) for _, (_, b) in seen} <= {2, 4, 8}


# ---- pixels ------------------------------------------------------------------------------------------------
def test_bitwise_identical_at_dct_scale_1_with_pillow_resize(photos, tiny_world):
    """Every 224-px crop of a 500x375 photo (DCT scale 1) and every crop of the tiny world: the uint8 pixels of
    resize="pil", normalised by normalize_uint8, equal the official pipeline's floats bit for bit."""
    for folder, size, n in ((photos["500x375"], 224, 60), (tiny_world["imagenet"] / "train", 32, 56)):
        off = SeededDataset(ImageFiles(folder, pretrain_transform(size)))
        fast = SeededDataset(ImageFiles(folder, decoder=FastRandomResizedCrop(size, resize="pil")))
        for k in keys(n, len(off)):
            a, b = off[k], fast[k]
            assert b[0].dtype == torch.uint8 and b[1:] == a[1:]
            assert torch.equal(normalize_uint8(b[0], IMAGENET_MEAN, IMAGENET_STD), a[0])


def test_torch_resize_within_tolerance_at_dct_scale_1(photos):
    off = SeededDataset(ImageFiles(photos["500x375"], pretrain_transform(224)))
    fast = SeededDataset(ImageFiles(photos["500x375"], decoder=FastRandomResizedCrop(224)))
    a = official_pixels(torch.stack([off[k][0] for k in keys(60, 3)]))
    b = torch.stack([fast[k][0] for k in keys(60, 3)]).float()
    assert (b.mean((2, 3)) - a.mean((2, 3))).abs().max() < 0.05
    assert (b.std((2, 3)) / a.std((2, 3)) - 1).abs().max() < 0.005
    assert (b - a).abs().round().le(1).float().mean() > 0.97  # most pixels within 1 of Pillow's


def test_pillow_resize_box_differs_from_crop_then_resize_only_at_the_border(photos):
    """Why scale 1 crops first: Pillow's resize(box=) reads source pixels beyond the box for the border outputs."""
    im = Image.open(sorted(photos["500x375"].glob("*.jpg"))[0]).convert("RGB")
    box = (50, 40, 350, 300)
    a = np.asarray(im.crop(box).resize((224, 224), Image.Resampling.BICUBIC)).astype(int)
    b = np.asarray(im.resize((224, 224), Image.Resampling.BICUBIC, box=box)).astype(int)
    diff = np.abs(a - b)
    assert diff[3:-3, 3:-3].max() == 0 and 0 < diff.max() <= 16 and (diff > 0).mean() < 0.05


@pytest.mark.parametrize("resize", ["torch", "pil"])
def test_statistics_match_at_reduced_dct_scales(photos, resize):
    """1600x1200 photos (every crop decoded at 1/2 or 1/4): paired crops, per-channel mean and std."""
    off = SeededDataset(ImageFiles(photos["1600x1200"], pretrain_transform(224)))
    fast = SeededDataset(ImageFiles(photos["1600x1200"], decoder=FastRandomResizedCrop(224, resize=resize)))
    ks = keys(45, 3)
    a = official_pixels(torch.stack([off[k][0] for k in ks]))
    b = torch.stack([fast[k][0] for k in ks]).float()
    assert (b.mean((0, 2, 3)) - a.mean((0, 2, 3))).abs().max() < 0.1
    assert (b.std((0, 2, 3)) / a.std((0, 2, 3)) - 1).abs().max() < 0.01
    assert (b.mean((2, 3)) - a.mean((2, 3))).abs().max() < 1.0
    assert (b.std((2, 3)) / a.std((2, 3)) - 1).abs().max() < 0.02


def test_uint8_normalize_hook_and_float_batches_pass_unchanged():
    hook = UInt8Normalize(IMAGENET_MEAN, IMAGENET_STD)
    u8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 2])
    out = hook((u8, labels, labels))
    official = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(Image.fromarray(x.permute(1, 2, 0).numpy())))
                            for x in u8])
    assert torch.equal(out[0], official) and out[1] is labels
    floats = (torch.randn(2, 3, 8, 8), labels, labels)
    assert hook(floats) is floats


def test_pixel_interleaved_collate_gives_the_default_batch(photos):
    """The fast path's collate stacks the decoders' HWC-memory images as they are (channels-last): the same values
    as default_collate's batch, normalised to the same contiguous floats."""
    from torch.utils.data import default_collate

    from maecore.data.decode import decode_collate
    from maecore.data.pixels import collate_pixels

    assert decode_collate("fast") is collate_pixels and decode_collate("official") is None
    ds = SeededDataset(build_pretrain_dataset(photos["500x375"], 64))
    samples = [ds[k] for k in keys(6, 3)]
    ours, default = collate_pixels(samples), default_collate(samples)
    assert len(ours) == len(default) == 3 and all(torch.equal(a, b) for a, b in zip(ours, default))
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    a, b = (normalize_uint8(x[0], IMAGENET_MEAN, IMAGENET_STD) for x in (ours, default))
    assert torch.equal(a, b) and a.is_contiguous()
    floats = [(torch.rand(3, 4, 4), 1, 0), (torch.rand(3, 4, 4), 2, 0)]
    assert torch.equal(collate_pixels(floats)[0], default_collate(floats)[0])


# ---- datasets: packed, resume, bad files -------------------------------------------------------------------
def test_packed_and_folder_give_the_same_fast_samples_and_resume_exactly(photos):
    folder = SeededDataset(build_pretrain_dataset(photos["500x375"], 224))  # fast is the default
    packed = SeededDataset(build_pretrain_dataset(photos["packed"], 224, decode="fast"))
    assert isinstance(packed.base, PackedImages) and isinstance(packed.base.decoder, FastRandomResizedCrop)
    ks = keys(12, 3)
    first = [folder[k][0] for k in ks]
    assert all(torch.equal(a, packed[k][0]) for a, k in zip(first, ks))
    assert all(torch.equal(a, folder[k][0]) for a, k in zip(first[5:], ks[5:]))  # any order, any restart point


def test_corrupt_files_skipped_and_counted_as_on_the_official_path(photos, tmp_path, caplog):
    """A truncated JPEG, a text file and an empty file: the same substitutes, skip counts and (Pillow resize)
    pixels as the official pipeline: a failed source leaves the RNG untouched."""
    d = corrupt_folder(photos, tmp_path)
    (d / "2_empty.jpg").write_bytes(b"")
    off = SeededDataset(ImageFiles(d, pretrain_transform(224)))
    fast = SeededDataset(ImageFiles(d, decoder=FastRandomResizedCrop(224, resize="pil")))
    gpu_worker = SeededDataset(ImageFiles(d, decoder=GpuJpegCrop(224)))
    names = [p.name for p, _ in off.base.samples]
    total = {"off": 0, "fast": 0, "gpu": 0}
    for k in keys(len(names), len(names)):
        a, b, g = off[k], fast[k], gpu_worker[k]
        assert a[1:] == b[1:] == g[1:]
        assert torch.equal(normalize_uint8(b[0], IMAGENET_MEAN, IMAGENET_STD), a[0])
        total["off"] += a[2]
        total["fast"] += b[2]
        total["gpu"] += g[2]
    assert total == {"off": 4, "fast": 4, "gpu": 4}  # 0_trunc: 1, 1_text: 2 (then 2_empty), 2_empty: 1
    assert "0_trunc.jpg" in caplog.text and "1_text.jpg" in caplog.text


# ---- the GPU path's two halves, on the CPU here -----------------------------------------------------------
def test_gpu_path_halves_on_cpu(photos, tmp_path):
    """Worker half: the same plans as the fast path, bytes for a JPEG, the CPU crop for a PNG; device half
    (decode_jpeg + v2 resize, here on the CPU): the fast path's pixels within 1 on > 97 % of the pixels."""
    png = tmp_path / "png"
    png.mkdir()
    Image.open(sorted(photos["500x375"].glob("*.jpg"))[0]).save(png / "a.png")
    fast = SeededDataset(ImageFiles(photos["500x375"], decoder=FastRandomResizedCrop(224)))
    worker = SeededDataset(ImageFiles(photos["500x375"], decoder=GpuJpegCrop(224)))
    ks = keys(9, 3)
    samples = [worker[k] for k in ks]
    assert all(isinstance(s[0][0], bytes) for s in samples)
    batch = collate_encoded(samples)
    assert isinstance(batch[0], EncodedBatch) and len(batch[0]) == 9
    out = GpuDecode(224, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))(batch)
    ref = normalize_uint8(torch.stack([fast[k][0] for k in ks]), IMAGENET_MEAN, IMAGENET_STD)
    assert out[0].shape == ref.shape and out[0].dtype == torch.float32
    close = ((out[0] - ref) * STD * 255).abs().round().le(1).float().mean()
    assert close > 0.97
    (payload, plan), _, _ = SeededDataset(ImageFiles(png, decoder=GpuJpegCrop(224)))[(0, 5)]
    assert payload.dtype == torch.uint8 and payload.shape == (3, 224, 224)
    torch.default_generator.manual_seed(5)
    assert torch.equal(payload, FastRandomResizedCrop(224)(png / "a.png"))
    # an image the decoder refuses at batch time is replaced by another of the batch and counted
    items = list(batch[0].items)
    items[1] = (items[1][0][:200] + b"\xff\xd9", items[1][1])
    out = GpuDecode(224, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))((EncodedBatch(items), batch[1], batch[2]))
    assert out[2].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0] and torch.isfinite(out[0]).all()


def test_decode_gpu_without_cuda_is_a_one_line_error(tiny_world, tmp_path, capsys):
    if CUDA:
        pytest.skip("a CUDA device is present")
    from pretrain.train import cli

    with pytest.raises(SystemExit) as e:
        cli(["--data_path", str(tiny_world["imagenet"]), "--output_dir", str(tmp_path / "o"), "--decode", "gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --decode gpu decodes JPEGs on a CUDA device") and "\n" not in err


# a 2-step linear probe of a random tiny encoder (the CUDA test runs it with --decode gpu)
LINPROBE_SMOKE = ["--protocol", "linprobe", "--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32",
                  "--batch_size", "8", "--no_progress", "--log_every", "1", "--epochs", "1", "--max_steps", "2", "--num_workers", "1"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (tools/gpu_check.sh runs these on one)")
def test_gpu_decode_on_cuda(photos, tmp_path, tiny_world, run_module):
    """nvJPEG decode + crop + resize on the device: the fast path's crops (same plans), pixel statistics within
    the tolerance of the reduced-scale test, normalisation bitwise as on the CPU; a 2-step pretraining run."""
    dev = torch.device("cuda")
    for name in ("500x375", "1600x1200"):
        fast = SeededDataset(ImageFiles(photos[name], decoder=FastRandomResizedCrop(224)))
        worker = SeededDataset(ImageFiles(photos[name], decoder=GpuJpegCrop(224)))
        ks = keys(24, 3)
        out = GpuDecode(224, IMAGENET_MEAN, IMAGENET_STD, dev)(collate_encoded([worker[k] for k in ks]))
        a = torch.stack([fast[k][0] for k in ks]).float()
        b = (out[0].cpu() * STD + MEAN) * 255
        assert (b.mean((0, 2, 3)) - a.mean((0, 2, 3))).abs().max() < 0.5
        assert (b.std((0, 2, 3)) / a.std((0, 2, 3)) - 1).abs().max() < 0.02
        assert (b.mean((2, 3)) - a.mean((2, 3))).abs().max() < 2.0
    u8 = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(normalize_uint8(u8.to(dev), IMAGENET_MEAN, IMAGENET_STD).cpu(), normalize_uint8(u8, IMAGENET_MEAN, IMAGENET_STD))
    out_dir = tmp_path / "gpu_run"
    run_module("pretrain", ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32", "--decoder_depth", "1",
                            "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress",
                            "--vis_every", "0", "--warmup_epochs", "1", "--log_every", "1", "--epochs", "1", "--max_steps", "2",
                            "--num_workers", "1", "--device", "cuda", "--decode", "gpu", "--data_path", tiny_world["imagenet"],
                            "--output_dir", out_dir])
    logs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["type"] == "train"] == [1, 2]
    # the classification probe's training images the same way (labels through collate_encoded and GpuDecode)
    run_module("classification", [*LINPROBE_SMOKE, "--device", "cuda", "--decode", "gpu", "--data_path", tiny_world["imagenet"],
                                  "--output_dir", tmp_path / "gpu_probe"])
    logs = [json.loads(line) for line in (tmp_path / "gpu_probe" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["type"] == "train"] == [1, 2]


# ---- the benchmark -----------------------------------------------------------------------------------------
def test_bench_data_smoke_prints_both_pipelines(tmp_path, capsys):
    from pipeline import benchmark as bench

    out = tmp_path / "data.json"
    res = bench.main(["--bench", "data", "--data_images", "4", "--photo_sizes", "96x64", "--num_workers", "0",
                      "--data_batch_size", "2", "--data_batches", "1", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "official" in text and "fast" in text and "cores/GPU" in text and "45% of 989 TFLOP/s" in text
    d = json.loads(out.read_text())["data"]
    formats = ("folder", "packed", "packed-roi") + (("http",) if "http" not in d["skipped"] else ())  # http: where nginx starts
    assert {(r["format"], r["pipeline"]) for r in d["runs"]} == {(f, p) for f in formats for p in ("official", "fast")}
    assert sorted((r["dataset"], r["pipeline"]) for r in d["http_vs_packed"]) == (
        [("photos", "fast"), ("photos", "official"), ("synthetic", "fast"), ("synthetic", "official")] if "http" in formats else [])
    assert all(r["ratio"] > 0 for r in d["http_vs_packed"])
    assert ("http: the packed copy read over HTTP" if "http" in formats else "http store skipped: ") in text
    assert all(r["img_per_s"] > 0 and r["cpu_img_per_s"] > 0 for r in d["runs"])  # 0 workers: CPU seconds too
    gpu = d["gpu_assumption"]
    assert gpu["train_flops_per_img"] == 6 * gpu["forward_macs_per_img"] and 5000 < gpu["gpu_img_per_s"] < 10000
    assert {(s["dataset"], s["format"]) for s in d["summary"]} == {(n, f) for n in ("synthetic", "photos") for f in formats}
    assert all(s["ratio_per_core"] > 0 and s["ratio_per_cpu_s"] > 0 and s["fast_cores_per_gpu"] > 0 for s in d["summary"])
    assert res["data"]["summary"] == d["summary"]


def test_one_call_jpeg_decode_equals_pillow_and_skips_corrupt_files(photos, tmp_path):
    """The default fast path decodes full-scale JPEGs with torchvision's libjpeg-turbo call: the same pixels as
    Pillow's decode (so the same crops as through Pillow), and truncated / non-JPEG files are still skipped and
    counted like the official path's."""
    from maecore.data.crop import _DECODE_JPEG

    assert _DECODE_JPEG is not None
    fast = FastRandomResizedCrop(224)
    for p in sorted(photos["500x375"].glob("*.jpg")):
        data = p.read_bytes()
        assert torch.equal(_DECODE_JPEG(torch.frombuffer(bytearray(data), dtype=torch.uint8)),
                           torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1))
        for seed in range(3):  # the one-call decode vs the Pillow decode under the same box: equal crops
            torch.manual_seed(seed)
            a = fast(p)
            torch.manual_seed(seed)
            with Image.open(p) as im:
                b = fast.render(im, fast.plan(im))  # no bytes given: Pillow decodes
            assert torch.equal(a, b)
    d = corrupt_folder(photos, tmp_path)
    off = SeededDataset(ImageFiles(d, pretrain_transform(224)))
    ours = SeededDataset(ImageFiles(d, decoder=FastRandomResizedCrop(224)))
    n = len(off.base.samples)
    assert sum(off[k][2] for k in keys(n, n)) == sum(ours[k][2] for k in keys(n, n)) == 2  # one skip each


def test_resize_operator_and_normalising_by_table_are_bitwise_the_plain_ops(photos):
    """The resize calls the operator ``F.interpolate`` calls: the same pixels, flipped or not (and flipping the box
    before the resize would give them too: torch's antialiased kernel is mirror-symmetric); the CPU batch normalisation
    looks values up in a table made by the float32 ops: the same floats as ``ToTensor`` + ``Normalize`` for every value
    and channel, any layout."""
    import torch.nn.functional as F

    from maecore.data.crop import _DECODE_JPEG
    from maecore.data.pixels import normalize_table

    rng = np.random.default_rng(0)
    paths = sorted(photos["500x375"].glob("*.jpg"))[:4]
    for size in ((224, 224), (96, 160)):
        fast = FastRandomResizedCrop(size)
        for p in paths:
            img = _DECODE_JPEG(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8))
            for _ in range(12):
                w, h = int(rng.integers(1, img.shape[2] + 1)), int(rng.integers(1, img.shape[1] + 1))
                left, top = int(rng.integers(0, img.shape[2] - w + 1)), int(rng.integers(0, img.shape[1] - h + 1))
                box = (left, top, left + w, top + h)
                ref = F.interpolate(img[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last),
                                    size=size, mode="bicubic", antialias=True)[0]
                assert torch.equal(fast._resize_box(img, box, False), ref)
                assert torch.equal(fast._resize_box(img, box, True), ref.flip(-1))
                flipped_first = F.interpolate(img[None, :, top:top + h, left:left + w].flip(-1), size=size, mode="bicubic",
                                              antialias=True)[0]
                assert torch.equal(flipped_first, ref.flip(-1))
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), ((0.5,), (0.25,))):
        m, s = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
        u8 = torch.arange(256, dtype=torch.uint8).view(16, 16)
        batch = torch.stack([u8, u8.t(), u8.flip(0)]).expand(2, 3, 16, 16)  # every value in every channel
        for x in (batch, batch.contiguous(memory_format=torch.channels_last), batch[:, :, 3:, 5:]):
            got = normalize_uint8(x, mean, std)
            assert got.is_contiguous() and torch.equal(got, x.float().div(255).sub(m).div(s))  # ToTensor + Normalize's ops
        assert normalize_table(mean, std).shape == (len(mean), 256)
