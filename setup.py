"""Build script: the Python package, plus the CUDA C++ core (csrc/, module dct_kernels._cuda)
built through CMake whenever nvcc is found.

Environment:
  DCT_KERNELS_CUDA       "1": build the extension or fail; "0": never build it;
                         unset: build it when nvcc (and cmake) are found, else skip with a line.
  DCT_KERNELS_CUDA_ARCH  CMAKE_CUDA_ARCHITECTURES, e.g. "90", "80;90", "native"
                         (default: "native" when nvidia-smi lists a GPU, else "80;90").
  CUDACXX, CUDA_HOME     where nvcc is, when it is not on the PATH (a CUDACXX that does not
                         exist counts as no nvcc).

The extension links only the static CUDA runtime (no libtorch), so it needs neither a CUDA
build of torch nor --no-build-isolation.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"dct_kernels: {message}", file=sys.stderr, flush=True)


def _executable(path) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _find_nvcc():
    if os.environ.get("CUDACXX"):  # named explicitly: that one or none
        return os.environ["CUDACXX"] if _executable(os.environ["CUDACXX"]) else None
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((path for path in candidates if _executable(path)), None)


def _default_arch() -> str:
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if listed.returncode == 0 and "GPU" in listed.stdout:
            return "native"
    except (OSError, subprocess.SubprocessError):
        pass
    return "80;90"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds CMakeExtensions with CMakeLists.txt; skips them when the toolchain is missing
    (unless DCT_KERNELS_CUDA=1 asks for them)."""

    def run(self):
        mode = os.environ.get("DCT_KERNELS_CUDA", "").strip()
        if mode == "0":
            _log("DCT_KERNELS_CUDA=0: not building the CUDA extension")
            return
        forced = mode == "1"
        nvcc, cmake = _find_nvcc(), shutil.which("cmake")
        missing = [name for name, path in (("nvcc", nvcc), ("cmake", cmake)) if not path]
        if missing:
            message = (f"{' and '.join(missing)} not found: building without the CUDA "
                       "extension (CUDA tensors will use the Triton backend)")
            if forced:
                raise RuntimeError(f"DCT_KERNELS_CUDA=1 but {message}")
            _log(message)
            return
        self._nvcc, self._cmake = nvcc, cmake
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  (any build failure)
            if forced:
                raise
            _log(f"building the CUDA extension failed ({exc}); installing without it. "
                 "Set DCT_KERNELS_CUDA=1 to make this an error.")

    def build_extension(self, ext):
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        arch = os.environ.get("DCT_KERNELS_CUDA_ARCH") or _default_arch()
        configure = [
            self._cmake, "-S", ROOT, "-B", build_dir,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
            f"-DDCT_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        _log(f"building the CUDA extension for CUDA architectures {arch} with {self._nvcc}")
        subprocess.run(configure, check=True)
        subprocess.run([self._cmake, "--build", build_dir, "-j", str(os.cpu_count() or 2)],
                       check=True)


setup(ext_modules=[CMakeExtension("dct_kernels._cuda")], cmdclass={"build_ext": CMakeBuild})
