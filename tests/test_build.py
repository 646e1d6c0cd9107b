"""setup.py's build switches.

CUDA: without nvcc the package builds and says so in one line; forced with DCT_KERNELS_CUDA=1
it fails loudly; DCT_KERNELS_CUDA=0 skips the extension. (Building the CUDA extension itself is
checked by test_cuda_ext where nvcc exists.)

cpu: the host module builds with the host compiler alone and works; DCT_KERNELS_CPU=0 skips
it; DCT_KERNELS_CPU=1 fails loudly when it cannot be built; DCT_KERNELS_SANITIZE=1 builds it
with the sanitizers. The sdist carries every source of both.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SWITCHES = ("DCT_KERNELS_CUDA", "DCT_KERNELS_CPU", "DCT_KERNELS_SANITIZE", "CUDACXX",
             "CUDA_HOME", "CXX")


def _build_ext(tmp_path, **env):
    environment = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def _log_lines(result, about: str):
    return [line for line in result.stderr.splitlines()
            if line.startswith("dct_kernels:") and about in line]


# ------------------------------------------------------------------------------------- CUDA

def test_missing_nvcc_skips_with_one_line(tmp_path):
    result = _build_ext(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"), DCT_KERNELS_CPU="0")
    assert result.returncode == 0, result.stderr
    lines = _log_lines(result, "CUDA")
    assert len(lines) == 1 and "nvcc" in lines[0] and "without the CUDA extension" in lines[0]
    assert not list((tmp_path / "lib").rglob("_cuda*"))


def test_forced_build_without_nvcc_fails_loudly(tmp_path):
    result = _build_ext(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"), DCT_KERNELS_CUDA="1",
                        DCT_KERNELS_CPU="0")
    assert result.returncode != 0
    assert "DCT_KERNELS_CUDA=1" in result.stderr and "nvcc" in result.stderr


def test_disabled_build_skips(tmp_path):
    result = _build_ext(tmp_path, DCT_KERNELS_CUDA="0", DCT_KERNELS_CPU="0")
    assert result.returncode == 0, result.stderr
    assert "DCT_KERNELS_CUDA=0" in result.stderr and "DCT_KERNELS_CPU=0" in result.stderr
    assert not list((tmp_path / "lib").rglob("*.so"))


# -------------------------------------------------------------------------------------- cpu

def _load_module(path):
    spec = importlib.util.spec_from_file_location("dct_kernels._cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_extension_builds_without_nvcc_and_works(tmp_path):
    """The host module needs no nvcc: with none to be found it still builds, and the built
    module selects a threshold correctly."""
    result = _build_ext(tmp_path, CUDACXX=str(tmp_path / "no-nvcc"), DCT_KERNELS_CPU="1")
    assert result.returncode == 0, result.stderr
    (built,) = (tmp_path / "lib").rglob("_cpu*.so")
    assert not list((tmp_path / "lib").rglob("_cuda*"))
    module = _load_module(built)
    x = torch.tensor([0.5, -3.0, 2.0, float("nan"), -0.0, 1.0])
    out = torch.empty(1)
    module.select_threshold(x=x.data_ptr(), dtype=0, offsets=[0, 6], ks=[3], out=out.data_ptr(),
                            threads=2)
    assert out.item() == 2.0  # NaN, 3, then 2
    with pytest.raises(RuntimeError, match="select_threshold"):
        module.select_threshold(x=x.data_ptr(), dtype=0, offsets=[0, 6], ks=[7],
                                out=out.data_ptr(), threads=1)


def test_cpu_disabled_build_skips(tmp_path):
    result = _build_ext(tmp_path, DCT_KERNELS_CPU="0", DCT_KERNELS_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert len(_log_lines(result, "DCT_KERNELS_CPU=0")) == 1
    assert not list((tmp_path / "lib").rglob("_cpu*"))


def test_cpu_forced_build_that_cannot_work_fails_loudly(tmp_path):
    """DCT_KERNELS_CPU=1 with a C++ compiler that does not exist: the install fails, and says
    which switch made it fail."""
    result = _build_ext(tmp_path, DCT_KERNELS_CPU="1", DCT_KERNELS_CUDA="0",
                        CXX=str(tmp_path / "no-c++"))
    assert result.returncode != 0
    assert "DCT_KERNELS_CPU=1" in result.stderr and "cpu extension failed" in result.stderr
    assert not list((tmp_path / "lib").rglob("_cpu*"))


def test_cpu_build_that_fails_is_skipped_with_one_line(tmp_path):
    result = _build_ext(tmp_path, DCT_KERNELS_CUDA="0", CXX=str(tmp_path / "no-c++"))
    assert result.returncode == 0, result.stderr
    lines = _log_lines(result, "failed")
    assert len(lines) == 1 and "cpu extension" in lines[0] and "DCT_KERNELS_CPU=1" in lines[0]
    assert not list((tmp_path / "lib").rglob("_cpu*"))


def test_sanitize_switch_reaches_the_compiler(tmp_path):
    """DCT_KERNELS_SANITIZE=1 compiles the host module with ASan and UBSan (checked in the
    generated build files; the module itself is run by scripts/sanitize_cpu.sh, since loading
    it needs libasan preloaded)."""
    environment = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    build = tmp_path / "cmake"
    import pybind11
    result = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DDCT_BUILD_CUDA=OFF",
         "-DDCT_SANITIZE=ON"], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    flags = "".join(p.read_text() for p in build.rglob("flags.make")) + \
        "".join(p.read_text() for p in build.rglob("build.ninja"))
    assert "-fsanitize=address,undefined" in flags
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "DCT_SANITIZE" in f.read()


# ------------------------------------------------------------------------------------ sdist

def test_sdist_carries_the_sources(tmp_path):
    """A source distribution can build both cores: CMakeLists.txt and every source of csrc/,
    csrc/cuda/ and csrc/cpu/ are in it (setuptools leaves out what MANIFEST.in does not name).
    Built from a copy of the sources, so that no earlier egg-info's file list stands in for
    MANIFEST.in."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", "bench", "tests"))
    environment = dict(os.environ, DCT_KERNELS_CUDA="0", DCT_KERNELS_CPU="0")
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist"),
         "--formats", "gztar"], cwd=source, env=environment, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"CMakeLists.txt"}
    for folder in ("csrc", os.path.join("csrc", "cuda"), os.path.join("csrc", "cpu")):
        wanted |= {f"{folder}/{name}" for name in os.listdir(os.path.join(ROOT, folder))
                   if name.endswith((".h", ".cuh", ".cu", ".cpp"))}
    assert any(name.startswith("csrc/cpu/") for name in wanted)
    assert any(name.startswith("csrc/cuda/") for name in wanted)
    assert wanted <= names, f"missing from the sdist: {sorted(wanted - names)}"
