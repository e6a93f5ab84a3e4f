"""tools/gpu_check.sh as the lent GPU machine runs it (issue #29), checked on the CPU machine up to the GPU.

The GPU machine is a stock image with torch but without pycocotools, fvcore, submitit (and what they need): they
travel as wheels (tools/gpu_wheels.sh).  Here a real interpreter stands in for the image's: a virtual environment
whose site-packages are this one's, less those distributions.  With it the CUDA tests must still collect, and the
real script must pick it (not an interpreter without torch), install the wheels with pip --no-index into a
temporary target and stop at the missing GPU with one line and exit status 2."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import os
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.gpu_wheels import DEV_ONLY, IMAGE, check_requirements, missing_on_image, normalize, project_requirements, runtime_requires
from tests import ROOT

CUDA = torch.cuda.is_available()
# what the image lacks of the project's requirements, and what those need that it lacks
CARRIED = {"pycocotools", "fvcore", "submitit", "iopath", "yacs", "termcolor"}


def test_the_wheels_are_exactly_what_the_image_lacks():
    carried = missing_on_image()
    assert set(carried) == CARRIED
    assert all(carried[name] == md.version(name) for name in carried)  # the versions the CPU tests run
    for req in project_requirements():
        assert normalize(req.name) in IMAGE | set(carried), req
    assert "ruff" in DEV_ONLY and "ruff" not in carried  # a developer tool: no GPU stage calls it
    # closed under Requires-Dist: what a carried package needs is on the image or carried too
    for name in carried:
        for req in runtime_requires(md.distribution(name)):
            assert normalize(req.name) in IMAGE | set(carried), (name, req)


def test_every_requirement_is_installed_here():
    """Test modules skip when pycocotools is missing (where only the CUDA tests run); here nothing may be."""
    assert check_requirements() == []


# ---- an interpreter like the image's ------------------------------------------------------------------------
def _top_level(dist: md.Distribution) -> set[str]:
    return {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def _make_venv(path: Path, site_from: Path | None = None, hide: set[str] = frozenset()) -> Path:
    """A real virtual environment; with ``site_from``, its site-packages hold links to that folder's entries,
    less the distributions in ``hide`` and this project's own install."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    python = path / "bin" / "python"
    if site_from is not None:
        site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                            text=True).strip())
        hidden = set().union(*(_top_level(md.distribution(name)) for name in hide))
        for entry in site_from.iterdir():
            own = entry.name.startswith(("__editable__", "mae_toolkit")) or entry.name.endswith(".egg-link")
            if entry.name not in hidden and not own and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return python


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """python with torch and the rest of this environment, but none of the carried distributions."""
    site_from = Path(torch.__file__).resolve().parents[1]
    return _make_venv(tmp_path_factory.mktemp("image") / "venv", site_from, CARRIED)


def _wheel_from_installed(name: str, out: Path) -> Path:
    """The installed distribution ``name`` packed back into a wheel (its files, its metadata, a fresh RECORD)."""
    dist = md.distribution(name)
    tag = next(line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag:"))
    stem = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}"
    files = [f for f in dist.files if not str(f).startswith("..") and "__pycache__" not in str(f) and not str(f).endswith("RECORD")]
    record_name = next(str(f) for f in dist.files if str(f).endswith(".dist-info/RECORD"))
    wheel = out / f"{stem}-{tag}.whl"
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            data = Path(f.locate()).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            z.writestr(str(f), data)
            rows.append(f"{f},sha256={digest},{len(data)}")
        z.writestr(record_name, "\n".join([*rows, f"{record_name},,", ""]))
    return wheel


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "GPU_WHEELS", "GPU_CHECK_PYTHONS")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_cuda_tests_collect_without_the_optional_packages(image_python):
    hidden = subprocess.run([str(image_python), "-c", "import pycocotools"], capture_output=True, text=True)
    assert hidden.returncode != 0 and "No module named 'pycocotools'" in hidden.stderr  # the stand-in lacks them ...
    p = subprocess.run([str(image_python), "-c", "import torch, timm, pytest; print(torch.__version__)"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]  # ... and has the rest
    # pytest -m cuda imports every test module to collect it
    cmd = [str(image_python), "-m", "pytest", "tests", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    collected = {line.split("::")[-1] for line in p.stdout.splitlines() if "::" in line}
    assert {"test_bf16_autocast_step", "test_compile_step", "test_fsdp_one_process", "test_gpu_decode_on_cuda"} <= collected
    assert " error" not in p.stdout.splitlines()[-1], p.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="on a GPU the script goes on to the whole acceptance run")
def test_gpu_check_sh_installs_the_wheels_and_stops_at_the_missing_gpu(image_python, tmp_path):
    script = ROOT / "tools" / "gpu_check.sh"
    no_torch = _make_venv(tmp_path / "bare")  # a python without torch comes first: it must be passed over
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    pythons = f"{no_torch} {image_python}"

    # no wheels: the missing packages are named at once, before the GPU
    p = subprocess.run(["bash", str(script), str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=_env(GPU_CHECK_PYTHONS=pythons, GPU_WHEELS=str(wheels)))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert "pycocotools is missing" in p.stderr and "fvcore is missing" in p.stderr and "tools/gpu_wheels.sh" in p.stderr
    log = (out / "setup.log").read_text()
    assert f"python: {no_torch} does not import torch" in log and f"python: {image_python}\n" in log

    # the carried wheels: installed with pip --no-index into a temporary target, then the missing GPU
    for name in sorted(CARRIED):
        _wheel_from_installed(name, wheels)
    p = subprocess.run(["bash", str(script), str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=_env(GPU_CHECK_PYTHONS=pythons, GPU_WHEELS=str(wheels)))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: no CUDA device here") and p.stderr.count("\n") == 1, p.stderr
    assert f"python: {image_python}" in p.stdout and f"wheels: {len(CARRIED)} from {wheels} into " in p.stdout
    site = Path(p.stdout.split(" into ", 1)[1].split()[0])
    assert not site.exists()  # the temporary target is removed with the run
    assert sorted(x.name for x in out.iterdir()) == ["setup.log"]  # nothing else before a GPU is found

    # an explicit PYTHON without torch is an error, not a silent fallback
    p = subprocess.run(["bash", str(script), str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=_env(PYTHON=str(no_torch), GPU_WHEELS=str(wheels)))
    assert p.returncode == 2 and p.stderr.startswith("error: no interpreter here imports torch") and p.stderr.count("\n") == 1


def test_the_readme_gives_the_exact_call():
    readme = (ROOT / "README.md").read_text()
    assert "tools/gpu_wheels.sh" in readme and 'command: bash tools/gpu_check.sh "$OUT"' in readme and 'carry: [".whl"]' in readme
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()
