"""setup.py's CUDA switch: without nvcc the package builds and says so in one line; forced
with DCT_KERNELS_CUDA=1 it fails loudly; DCT_KERNELS_CUDA=0 skips the extension. (Building the
extension itself is checked by test_cuda_ext where nvcc exists.)"""

import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_ext(tmp_path, **env):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("DCT_KERNELS_CUDA", "CUDACXX", "CUDA_HOME")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


def test_missing_nvcc_skips_with_one_line(tmp_path):
    result = _build_ext(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dct_kernels:")]
    assert len(lines) == 1 and "nvcc" in lines[0] and "without the CUDA extension" in lines[0]
    assert not list((tmp_path / "lib").rglob("_cuda*"))


def test_forced_build_without_nvcc_fails_loudly(tmp_path):
    result = _build_ext(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"), DCT_KERNELS_CUDA="1")
    assert result.returncode != 0
    assert "DCT_KERNELS_CUDA=1" in result.stderr and "nvcc" in result.stderr


def test_disabled_build_skips(tmp_path):
    result = _build_ext(tmp_path, DCT_KERNELS_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert "DCT_KERNELS_CUDA=0" in result.stderr
    assert not list((tmp_path / "lib").rglob("_cuda*"))


def test_sdist_carries_the_cuda_sources(tmp_path):
    """A source distribution can build the extension: CMakeLists.txt and every source of csrc/
    are in it (setuptools leaves out what MANIFEST.in does not name). Built from a copy of the
    sources, so that no earlier egg-info's file list stands in for MANIFEST.in."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", "bench", "tests"))
    environment = dict(os.environ, DCT_KERNELS_CUDA="0")
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist"),
         "--formats", "gztar"], cwd=source, env=environment, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    csrc = [name for name in os.listdir(os.path.join(ROOT, "csrc"))
            if name.endswith((".h", ".cuh", ".cu", ".cpp"))]
    wanted = {"CMakeLists.txt"} | {f"csrc/{name}" for name in csrc}
    assert wanted <= names, f"missing from the sdist: {sorted(wanted - names)}"
