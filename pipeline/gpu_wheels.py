"""The wheels that the lent GPU machine lacks (``tools/gpu_wheels.sh [DIR]`` = ``python -m pipeline.gpu_wheels``).

The GPU machine is a stock image (Python 3.12, PyTorch and most of what the project needs: :data:`IMAGE`) that
reaches no package registry.  What the project needs there and the image does not hold (its dependencies and
extras, less what no GPU stage calls (:data:`DEV_ONLY`), and what those need in turn, read from their
``Requires-Dist``) travels as Python 3.12 manylinux wheels in a git-ignored folder (``.whl``) sent along with the
working tree; ``tools/gpu_check.sh`` installs them there with ``pip --no-index`` into a temporary target first.
Each wheel is the version installed here, so the GPU run imports what the CPU tests ran; a package published
only as a source archive is built here into a wheel, which must be pure Python.

:func:`check_requirements` is the other side: on the GPU machine, before any GPU time is spent, every
requirement must be installed at a version it allows.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from maecore.cli import OneLineParser
from maecore.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.12"
# the image's packages, as the device documentation listed them on 2026-11-17 (python3 3.12.3, torch 2.11.0+cu130)
IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# what no test or stage of the GPU run calls: a developer tool, and Weights & Biases (an optional logger, --loggers
# wandb; its offline test runs on the CPU and skips, saying why, where wandb is missing)
DEV_ONLY = frozenset({"ruff", "wandb"})
# the markers of the GPU machine's interpreter, for the requirements that hold only on some platforms
TARGET_MARKERS = {"python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# pip matches a manylinux tag exactly: every glibc from CentOS 7's to the image's (Ubuntu 24.04: 2.39)
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]


def normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` and ``pyyaml``, ``typing_extensions`` and ``typing-extensions`` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list:
    """The project's dependencies and every extra's (``packaging`` Requirements), less :data:`DEV_ONLY`."""
    from packaging.requirements import Requirement

    project = tomllib.loads(pyproject.read_text())["project"]
    texts = [*project.get("dependencies", []), *(r for rs in project.get("optional-dependencies", {}).values() for r in rs)]
    seen, out = set(), []
    for text in texts:
        req = Requirement(text)
        name = normalize(req.name)
        if name not in DEV_ONLY and name not in seen and (req.marker is None or req.marker.evaluate(TARGET_MARKERS)):
            seen.add(name)
            out.append(req)
    return out


def runtime_requires(dist: md.Distribution) -> list:
    """A distribution's ``Requires-Dist`` that apply on the GPU machine (no extras)."""
    from packaging.requirements import Requirement

    reqs = [Requirement(text) for text in dist.requires or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_MARKERS)]


def missing_on_image(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """What travels: ``{name: version installed here}`` for each requirement the image lacks, and for what those
    require that the image lacks, recursively (read from the installed distributions' metadata)."""
    todo = [normalize(r.name) for r in project_requirements(pyproject)]
    out: dict[str, str] = {}
    while todo:
        name = todo.pop(0)
        if name in IMAGE or name in out:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise UserError(f"{name} is not installed for {sys.executable}: install the project with its extras first "
                            "(pip install -e '.[test]')") from None
        out[name] = dist.version
        todo += [normalize(r.name) for r in runtime_requires(dist)]
    return out


def _pure(wheel: Path) -> bool:
    """A wheel that runs on any Python 3 (tags ``py3-none-any``, ``py2.py3-none-any``)."""
    python, abi, platform = wheel.stem.split("-")[-3:]
    return "py3" in python.split(".") and abi == "none" and platform == "any"


def fetch(name: str, version: str, into: Path, python: str = sys.executable) -> Path:
    """The Python 3.12 manylinux wheel of ``name==version`` from the package index; a package published only as a
    source archive is built here, and must then be pure Python."""
    before = set(into.glob("*.whl"))
    spec = f"{name}=={version}"
    base = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    cmd = [*base, "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
           *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(into), spec]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:  # no wheel for 3.12 (fvcore, iopath: source archives only)
        p = subprocess.run([*base, "wheel", "--no-deps", "--no-binary", name, "-w", str(into), spec], capture_output=True, text=True)
        new = sorted(set(into.glob("*.whl")) - before)
        if p.returncode != 0 or len(new) != 1:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"no Python {PYTHON_VERSION} wheel of {spec}, and building one failed: {last}")
        if not _pure(new[0]):
            raise UserError(f"{spec} has no Python {PYTHON_VERSION} wheel and is not pure Python ({new[0].name})")
    new = sorted(set(into.glob("*.whl")) - before)
    if len(new) != 1:
        raise UserError(f"expected one wheel of {spec}, got {[w.name for w in new]}")
    return new[0]


def download(packages: dict[str, str], out: Path, python: str = sys.executable) -> list[Path]:
    """Every wheel of ``packages`` into ``out``, which then holds those wheels and no other (two versions of one
    package would stop the install there)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".whl-") as tmp:
        wheels = [fetch(name, version, Path(tmp), python) for name, version in sorted(packages.items())]
        for old in out.glob("*.whl"):
            old.unlink()
        return [Path(shutil.move(w, out / w.name)) for w in wheels]


def check_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's requirements that this interpreter lacks or holds at a version they exclude, one phrase each."""
    problems = []
    for req in project_requirements(pyproject):
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req.name} is missing")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is not {req.specifier}")
    return problems


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("tools/gpu_wheels.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=".whl", help="where the wheels go (default .whl, git-ignored; carry it)")
    p.add_argument("--list", action="store_true", help="print what the image lacks and download nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    packages = missing_on_image()
    if args.list:
        for name, version in sorted(packages.items()):
            print(f"{name}=={version}")
        return 0
    out = Path(args.dir)
    wheels = download(packages, out if out.is_absolute() else ROOT / out)
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels in {args.dir} ({size / 2**20:.1f} MiB): " + ", ".join(w.name for w in wheels))
    return 0


def cli(argv: list[str] | None = None) -> None:
    try:
        sys.exit(main(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


__all__ = ["IMAGE", "check_requirements", "download", "missing_on_image", "project_requirements"]

if __name__ == "__main__":
    cli()
