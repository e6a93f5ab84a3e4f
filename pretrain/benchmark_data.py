"""The input pipeline's benchmark for ``tools/benchmark.py`` (``pipeline.benchmark``, ``--bench data``): the official
and the fast ``--decode`` against the model's step rate and the cores one GPU needs (moved out of
``pretrain.benchmark``, unchanged).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from maecore.benchmark import fmt
from maecore.engine import to_device
from maecore.errors import UserError
from pretrain.benchmark import mae_macs
from pretrain.model import build_mae


# --------------------------------------------------------------------------------------------------
# Data pipeline
# --------------------------------------------------------------------------------------------------
def parse_hw(text: str) -> tuple[int, int]:
    """'500x375' (W x H, as photo sizes are quoted) -> (H, W)."""
    try:
        w, h = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise UserError(f"photo size must look like 500x375 (width x height), got {text!r}") from None
    if w < 16 or h < 16:
        raise UserError(f"photo size {text} is too small")
    return h, w


def make_photo_folder(root: Path, n: int, hw: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JPEG photos (q90, Pillow's 4:2:0) of size ``hw`` (H, W) in ``root``: random crops / flips of scikit-image's
    bundled photographs, resized, so decode cost matches real photos (texture, not flat colour).  The benchmark
    writes them into one class folder (``root/photo/``), so torchvision's ``ImageFolder`` reads the set."""
    import numpy as np
    from PIL import Image
    from skimage import data as skd

    root.mkdir(parents=True, exist_ok=True)
    srcs = [Image.fromarray(f()) for f in (skd.astronaut, skd.chelsea, skd.coffee, skd.rocket)]
    rng = np.random.default_rng(seed)
    h, w = hw
    for i in range(n):
        im = srcs[i % len(srcs)]
        sw, sh = im.size
        cw, ch = int(sw * rng.uniform(0.6, 1.0)), int(sh * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        out = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        out.save(root / f"photo_{i:05d}.jpg", quality=90)
    return root


def data_sets(work: Path, data_path: str | None, data_images: int, synthetic_size: int, photo_sizes: list[str],
              seed: int) -> list[tuple[str, str, Path]]:
    """(name, image size, folder) of every image set the data benchmark reads."""
    if data_path:
        return [("user", "as stored", Path(data_path))]
    from synthetic import make_imagenet

    sets = []
    per_class = max(1, math.ceil(data_images / 10))
    root = make_imagenet(work / "synthetic", per_class, 0, size=synthetic_size, seed=seed, overwrite=True)
    sets.append(("synthetic", f"{synthetic_size}x{synthetic_size}", root / "train"))
    for text in photo_sizes:
        folder = work / f"photos_{text}"
        make_photo_folder(folder / "photo", data_images, parse_hw(text), seed)  # one class folder: ImageFolder's layout
        sets.append(("photos", text, folder))
    return sets


def official_dataset(folder: Path, input_size: int, jpeg_draft: bool = False):
    """What a user's run of the official scripts reads: torchvision's ``ImageFolder`` with the official transforms
    (:func:`pretrain.data.pretrain_transform`) and its default loader (Pillow: open, ``convert("RGB")``) on the original
    image folder (``jpeg_draft``: a loader with the old draft decode).  A folder without class folders (which
    ``ImageFolder`` refuses) or a packed one: the same transforms through this project's dataset."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import default_loader

    from maecore.data.images import load_rgb
    from maecore.data.packed.index import split_dir
    from pretrain.data import build_pretrain_dataset, pretrain_transform, resolve_train_dir

    root = resolve_train_dir(folder)
    if split_dir(root) is not None or not any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir()):
        return build_pretrain_dataset(root, input_size, jpeg_draft=jpeg_draft, decode="official")
    size = (input_size, input_size)
    loader = (lambda path: load_rgb(path, size)) if jpeg_draft else default_loader
    return ImageFolder(str(root), transform=pretrain_transform(size), loader=loader)


H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak
GPU_MFU_ASSUMED = 0.45


def gpu_rate_assumption(model_name: str = "mae_vit_base_patch16", input_size: int = 224, mask_ratio: float = 0.75) -> dict[str, Any]:
    """The images per second one GPU would consume pretraining ``model_name`` (its default 8 x 512 decoder): the
    analytic training FLOPs per image (2 FLOPs per multiply-add, x 3 for forward + backward: :func:`mae_macs`)
    at 45 % of an H100's dense bf16 peak.  The model is built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = build_mae(model_name, img_size=input_size)
    macs = mae_macs(model, mask_ratio)["total"]
    flops = 6 * macs
    rate = GPU_MFU_ASSUMED * H100_BF16_TFLOPS * 1e12 / flops
    return {"model": model_name, "input_size": input_size, "mask_ratio": mask_ratio, "forward_macs_per_img": macs,
            "train_flops_per_img": flops, "peak_tflops": H100_BF16_TFLOPS, "mfu": GPU_MFU_ASSUMED, "gpu_img_per_s": rate,
            "text": f"{model_name} ({input_size} px, mask {mask_ratio:g}, decoder 8 x 512): {flops / 1e9:.1f} GFLOP per image "
                    f"per training step (6 x {macs / 1e9:.2f} G multiply-adds) at {GPU_MFU_ASSUMED:.0%} of "
                    f"{H100_BF16_TFLOPS:g} TFLOP/s (H100 SXM, dense bf16) = {rate:.0f} img/s per GPU"}


class LoaderTimer:
    """Times windows of batches out of one DataLoader like the engine's (persistent workers, pinned memory on GPU),
    after its workers have started and produced a first batch; each batch is made ready for the model as the
    engine does (``to_device``, then ``finish``: the fast path's normalisation happens here, in this process).
    Without workers several timers can live side by side, so competing pipelines take turns (:func:`interleaved_rates`;
    with workers, a loader refills its prefetch queue after its turn, on the cores the next turn needs).  Records
    wall-clock seconds, and this process's CPU seconds (with 0 workers: all the work)."""

    PREFETCH = 2

    def __init__(self, dataset, batch_size: int, num_workers: int, batches: int, pin: bool, collate_fn=None,
                 finish=None, device: torch.device | None = None) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        self.bs = min(batch_size, len(dataset))
        drain = self.PREFETCH * num_workers + 1
        sampler = RandomSampler(dataset, replacement=True, num_samples=self.bs * (batches + drain + 1))
        self.loader = DataLoader(dataset, batch_size=self.bs, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                                 collate_fn=collate_fn, drop_last=True, persistent_workers=num_workers > 0,
                                 prefetch_factor=self.PREFETCH if num_workers else None)
        self.finish, self.device = finish, device or torch.device("cpu")
        self.images, self.wall, self.cpu = 0, 0.0, 0.0
        self.it = iter(self.loader)
        # start the workers and drain the batches they prefetched, so the timed ones arrive at the
        # steady-state rate (the main process consumes instantly, as a fast GPU would)
        for _ in range(drain):
            self.ready(next(self.it))

    def ready(self, batch):
        batch = to_device(batch, self.device)
        batch = self.finish(batch) if self.finish is not None else batch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return batch

    def window(self, batches: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            self.ready(next(self.it))
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.images += batches * self.bs

    def close(self) -> None:
        from maecore.data.workers import shutdown_workers

        shutdown_workers(self.loader)
        del self.it


def interleaved_rates(timers: list[LoaderTimer], batches: int, windows: int = 2) -> list[tuple[float, float]]:
    """(wall-clock img/s, img per CPU-second of this process) of each timer over ``batches`` batches, timed in
    ``windows`` turns per timer in mirrored order (A B B A ...): drift of a shared machine hits every pipeline alike."""
    sizes = [batches // windows + (k < batches % windows) for k in range(windows)]
    for k, n in enumerate(sizes):
        for t in (timers if k % 2 == 0 else timers[::-1]):
            if n:
                t.window(n)
    return [(t.images / t.wall, t.images / t.cpu if t.cpu > 0 else float("nan")) for t in timers]


def per_core(runs: list[dict[str, Any]], key: str = "img_per_s") -> float | None:
    """img/s of one core: the run in the main process (0 workers) if measured, else the 1-worker run (``key``:
    ``cpu_img_per_s``, images per CPU-second, exists for the 0-worker runs only)."""
    by = {r["num_workers"]: r.get(key) for r in runs}
    return by.get(0, by.get(1)) if key == "img_per_s" else by.get(0)


def data_summary(runs: list[dict[str, Any]], gpu_img_per_s: float) -> list[dict[str, Any]]:
    """Per image set and storage format: official vs fast img/s on one core and on the most workers measured,
    their ratio, and the cores each needs to feed one GPU (GPU img/s / img/s per core)."""
    out = []
    for ds, size, fmt_ in dict.fromkeys((r["dataset"], r["image_size"], r["format"]) for r in runs):
        sel = [r for r in runs if (r["dataset"], r["image_size"], r["format"]) == (ds, size, fmt_) and not r["jpeg_draft"]]
        off = [r for r in sel if r["pipeline"] == "official"]
        fast = [r for r in sel if r["pipeline"] == "fast"]
        if not off or not fast:
            continue
        most = max(r["num_workers"] for r in sel)
        o1, f1 = per_core(off), per_core(fast)
        oc, fc = per_core(off, "cpu_img_per_s"), per_core(fast, "cpu_img_per_s")
        oa = next(r["img_per_s"] for r in off if r["num_workers"] == most)
        fa = next(r["img_per_s"] for r in fast if r["num_workers"] == most)
        out.append({"dataset": ds, "image_size": size, "format": fmt_, "official_per_core": o1, "fast_per_core": f1,
                    "ratio_per_core": f1 / o1 if o1 and f1 else None, "official_per_cpu_s": oc, "fast_per_cpu_s": fc,
                    "ratio_per_cpu_s": fc / oc if oc and fc else None, "workers_all": most, "official_all": oa, "fast_all": fa,
                    "ratio_all": fa / oa, "official_cores_per_gpu": gpu_img_per_s / o1 if o1 else None,
                    "fast_cores_per_gpu": gpu_img_per_s / f1 if f1 else None})
    return out


DATA_FORMATS = ("folder", "packed", "packed-roi", "http")  # how the data benchmark stores each generated set (see data_bench)


def data_bench(device: torch.device, *, input_size: int, batch_size: int, batches: int, num_workers: list[int],
               jpeg_draft: bool, model_img_per_s: float | None, data_path: str | None, data_dir: str | None,
               data_images: int, synthetic_size: int, photo_sizes: list[str], seed: int,
               formats: tuple[str, ...] = DATA_FORMATS) -> dict[str, Any]:
    """The pretraining input pipeline's img/s, the official (torchvision transforms, float batches; also with
    the old JPEG draft decoding with ``jpeg_draft``) next to the fast one (``--decode fast``: DCT scale from the
    crop, uint8, normalised in this process), for each worker count, on ``data_path`` or else on generated sets
    (written under ``data_dir`` or a temporary folder) stored as a folder, packed with the original bytes and packed
    with ``--roi`` (re-encoded at quality 90 with restart markers), and the packed copy read over HTTP from an nginx on
    localhost (``http``: range requests, :mod:`maecore.data.packed.remote`; skipped with a line where nginx cannot
    start); ``formats`` picks among them; next to the model step rate ``model_img_per_s`` and the cores each pipeline
    needs to feed one GPU (:func:`gpu_rate_assumption`).  The official pipeline always reads the original folder through
    torchvision's ``ImageFolder`` (:func:`official_dataset`), as a user's official run does, whatever the format the
    fast one reads."""
    from maecore.data.packed.index import INDEX_NAME, split_dir
    from maecore.data.packed.serve import LocalNginx, NginxUnavailable
    from maecore.data.packed.writer import pack
    from pretrain.data import build_pretrain_dataset, pretrain_collate, pretrain_device_batch

    tmp = None
    if data_dir:
        work = Path(data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mae-bench-")
        work = Path(tmp.name)
    gpu = gpu_rate_assumption(input_size=input_size)
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    server = None
    try:
        stores: list[tuple[str, str, str, Path | str, Path]] = []
        served: list[tuple[str, str, Path, Path]] = []  # packed sets (and their original folders) the http store reads through nginx
        for name, size, folder in data_sets(work, data_path, data_images, synthetic_size, photo_sizes, seed):
            if data_path:
                packed = split_dir(folder)
                stores.append((name, size, "packed" if packed is not None else "folder", folder, folder))
                if packed is not None and "http" in formats:
                    served.append((name, size, packed, folder))
                continue
            for fmt_ in formats:
                if fmt_ in ("packed", "packed-roi"):
                    dst = work / fmt_ / f"{name}_{size}"
                    pack(folder, dst, force=True, workers=0, say=lambda _m: None, roi="mcu" if fmt_ == "packed-roi" else None)
                    stores.append((name, size, fmt_, dst, folder))
                elif fmt_ == "folder":
                    stores.append((name, size, fmt_, folder, folder))
            if "http" in formats:
                dst = work / "packed" / f"{name}_{size}"
                if not (dst / INDEX_NAME).is_file():
                    pack(folder, dst, force=True, workers=0, say=lambda _m: None)
                served.append((name, size, dst, folder))
        if served:
            root = Path(os.path.commonpath([str(p.parent) for _, _, p, _ in served]))
            try:
                server = LocalNginx(root, Path(tempfile.mkdtemp(prefix="mae-bench-nginx-")), log=False).start()
            except NginxUnavailable as e:
                skipped["http"] = str(e)
            else:
                stores += [(name, size, "http", f"{server.url}/{p.relative_to(root).as_posix()}", original)
                           for name, size, p, original in served]
        variants = [("official", False), *([("official", True)] if jpeg_draft else []), ("fast", False)]
        for name, size, fmt_, folder, original in stores:
            for nw in num_workers:
                def timer(pipeline: str, draft: bool, nw: int = nw, folder: Path | str = folder, original: Path = original) -> LoaderTimer:
                    ds = (official_dataset(original, input_size, draft) if pipeline == "official"
                          else build_pretrain_dataset(folder, input_size, decode=pipeline))
                    return LoaderTimer(ds, batch_size, nw, batches, device.type == "cuda", pretrain_collate(pipeline),
                                       pretrain_device_batch(pipeline, input_size, device), device)

                if nw == 0:  # the pipelines' loaders side by side, timed in turns: drift of a shared machine hits each alike
                    timers = [timer(pipeline, draft) for pipeline, draft in variants]
                    try:
                        rates = interleaved_rates(timers, batches, windows=4)
                    finally:
                        for t in timers:
                            t.close()
                else:  # one after the other: a loader's workers refill its prefetch queue after its turn, which would
                    rates = []  # steal the cores from the next pipeline's turn
                    for pipeline, draft in variants:
                        t = timer(pipeline, draft)
                        try:
                            rates.append(interleaved_rates([t], batches, windows=1)[0])
                        finally:
                            t.close()
                for (pipeline, draft), (rate, cpu_rate) in zip(variants, rates):
                    reads = "the original folder (torchvision ImageFolder)" if pipeline == "official" else fmt_
                    runs.append({"dataset": name, "image_size": size, "format": fmt_, "reads": reads, "pipeline": pipeline,
                                 "jpeg_draft": draft,
                                 "num_workers": nw, "img_per_s": rate, "img_per_s_per_worker": rate / max(nw, 1),
                                 "cpu_img_per_s": cpu_rate if nw == 0 else None,
                                 "vs_model": rate / model_img_per_s if model_img_per_s else None})
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.tmp, ignore_errors=True)
        if tmp is not None:
            tmp.cleanup()
    return {"input_size": input_size, "batch_size": batch_size, "batches": batches,
            "model_img_per_s": model_img_per_s, "gpu_assumption": gpu, "runs": runs,
            "summary": data_summary(runs, gpu["gpu_img_per_s"]), "http_vs_packed": http_vs_packed(runs), "skipped": skipped}


def http_vs_packed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The http store's img/s over the same pack's on local disk, per image set, pipeline and worker count (``ratio``:
    wall-clock; ``cpu_ratio``, 0 workers: per CPU-second of the process, its fetching threads included)."""
    key = lambda r: (r["dataset"], r["image_size"], r["pipeline"], r["jpeg_draft"], r["num_workers"])  # noqa: E731
    local = {key(r): r for r in runs if r["format"] == "packed"}
    out = []
    for r in runs:
        if r["format"] == "http" and (p := local.get(key(r))) is not None:
            cpu = r["cpu_img_per_s"] / p["cpu_img_per_s"] if r.get("cpu_img_per_s") and p.get("cpu_img_per_s") else None
            out.append({"dataset": r["dataset"], "image_size": r["image_size"], "pipeline": r["pipeline"], "jpeg_draft": r["jpeg_draft"],
                        "num_workers": r["num_workers"], "packed": p["img_per_s"], "http": r["img_per_s"],
                        "ratio": r["img_per_s"] / p["img_per_s"], "cpu_ratio": cpu})
    return out


def format_data(d: dict[str, Any]) -> list[str]:
    lines = ["", f"## data pipeline: decode + RandomResizedCrop({d['input_size']}, 0.2-1, bicubic) + flip + normalise, batch ready "
             f"for the model; model step rate {fmt(d['model_img_per_s'])} img/s",
             "official: torchvision ImageFolder + transforms in the workers on the original folder whatever the format, float "
             "batches (draft: the old --jpeg_draft); "
             "fast: --decode fast (DCT scale from the crop, uint8, normalised in the main process); formats: folder, packed "
             "(original bytes), packed-roi (maecore.data.packed --roi: re-encoded q90 with restart markers, fast decodes the box only), "
             "http (the packed copy over HTTP range requests from nginx on localhost)",
             f"{'images':<10} {'size':>10} {'format':>10} {'pipeline':>9} {'draft':>6} {'workers':>7} {'img/s':>9} {'vs model':>9}"]
    for r in d["runs"]:
        lines.append(f"{r['dataset']:<10} {r['image_size']:>10} {r['format']:>10} {r['pipeline']:>9} {r['jpeg_draft']!s:>6} "
                     f"{r['num_workers']:>7} {r['img_per_s']:>9.1f} {fmt(r['vs_model']):>9}")
    for fmt_, why in d.get("skipped", {}).items():
        lines.append(f"{fmt_} store skipped: {why}")
    if d.get("http_vs_packed"):
        lines += ["", "http: the packed copy read over HTTP range requests from nginx on localhost, vs the same pack on local disk",
                  "(img/s; ratio per CPU-second of the loading process with 0 workers, its fetching threads included)",
                  f"{'images':<10} {'size':>10} {'pipeline':>9} {'draft':>6} {'workers':>7} {'packed':>9} {'http':>9} {'ratio':>6} "
                  f"{'per CPU-s':>9}"]
        lines += [f"{r['dataset']:<10} {r['image_size']:>10} {r['pipeline']:>9} {r['jpeg_draft']!s:>6} {r['num_workers']:>7} "
                  f"{r['packed']:>9.1f} {r['http']:>9.1f} {r['ratio']:>6.2f} {fmt(r.get('cpu_ratio')):>9}" for r in d["http_vs_packed"]]
    gpu = d.get("gpu_assumption")
    if d.get("summary") and gpu:
        lines += ["", f"assumed GPU consumption: {gpu['text']}",
                  "per core = 0 workers (the main process alone; else 1 worker): wall-clock img/s, and img per CPU-second of "
                  "the process (what other jobs time-sharing the core do not change); all = the most workers measured",
                  f"{'images':<10} {'size':>10} {'format':>10} {'official/core':>14} {'fast/core':>10} {'ratio':>6} "
                  f"{'off./CPU-s':>10} {'fast/CPU-s':>10} {'ratio':>6} "
                  f"{'workers':>7} {'official':>9} {'fast':>9} {'ratio':>6} {'cores/GPU off.':>14} {'cores/GPU fast':>14}"]
        for r in d["summary"]:
            lines.append(f"{r['dataset']:<10} {r['image_size']:>10} {r['format']:>10} {fmt(r['official_per_core']):>14} "
                         f"{fmt(r['fast_per_core']):>10} {fmt(r['ratio_per_core']):>6} {fmt(r.get('official_per_cpu_s')):>10} "
                         f"{fmt(r.get('fast_per_cpu_s')):>10} {fmt(r.get('ratio_per_cpu_s')):>6} {r['workers_all']:>7} "
                         f"{r['official_all']:>9.1f} {r['fast_all']:>9.1f} {r['ratio_all']:>6.2f} "
                         f"{fmt(r['official_cores_per_gpu']):>14} {fmt(r['fast_cores_per_gpu']):>14}")
    return lines
