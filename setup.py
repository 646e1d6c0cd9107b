"""Build script: the Python package plus its two compiled cores, each built through CMake:

  dct_kernels._cpu   host C++ kernels (csrc/cpu/), built with the host compiler whenever
                     cmake and a C++17 compiler are found (no nvcc, no CUDA torch needed);
  dct_kernels._cuda  the CUDA core (csrc/cuda/), built whenever nvcc is found.

Each is optional: the package works without them (CPU tensors then use the torch reference,
CUDA tensors the Triton backend).

Environment:
  DCT_KERNELS_CPU        "1": build the host module or fail; "0": never build it;
                         unset: build it when cmake and a C++ compiler work, else skip with a line.
  DCT_KERNELS_SANITIZE   "1": build the host module with -fsanitize=address,undefined (for
                         scripts/sanitize_cpu.sh; such a module needs libasan preloaded).
  DCT_KERNELS_CUDA       "1": build the CUDA extension or fail; "0": never build it;
                         unset: build it when nvcc (and cmake) are found, else skip with a line.
  DCT_KERNELS_CUDA_ARCH  CMAKE_CUDA_ARCHITECTURES, e.g. "90", "80;90", "native"
                         (default: "native" when nvidia-smi lists a GPU, else "80;90").
  CUDACXX, CUDA_HOME     where nvcc is, when it is not on the PATH (a CUDACXX that does not
                         exist counts as no nvcc).
  CXX                    the host C++ compiler (CMake's default when unset).
  MAX_JOBS               parallel compile jobs (default: the number of CPUs).

Neither module links libtorch (the CUDA one links only the static CUDA runtime), so they need
neither a CUDA build of torch nor --no-build-isolation.
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


def _mode(variable: str) -> str:
    return os.environ.get(variable, "").strip()


class CMakeExtension(Extension):
    def __init__(self, name: str, kind: str):
        super().__init__(name, sources=[])
        self.kind = kind  # "cpu" or "cuda"


class CMakeBuild(build_ext):
    """Builds each CMakeExtension with its own CMake configuration; skips one whose toolchain
    is missing or whose build fails, unless its switch (=1) asks for it."""

    def run(self):
        self._cmake = shutil.which("cmake")
        wanted = [ext for ext in self.extensions if self._wanted(ext)]
        # Build into build_lib as build_ext.run does (it copies to the source tree itself
        # for --inplace / editable installs), then hand it only the modules that built.
        inplace, self.inplace = self.inplace, 0
        try:
            self.extensions = [ext for ext in wanted if self._build_one(ext)]
        finally:
            self.inplace = inplace
        self._built = {ext.name for ext in self.extensions}
        super().run()

    def _wanted(self, ext) -> bool:
        if ext.kind == "cpu":
            mode = _mode("DCT_KERNELS_CPU")
            if mode == "0":
                _log("DCT_KERNELS_CPU=0: not building the cpu extension")
                return False
            if not self._cmake:
                message = ("cmake not found: building without the cpu extension (CPU tensors "
                           "will use the torch backend)")
                if mode == "1":
                    raise RuntimeError(f"DCT_KERNELS_CPU=1 but {message}")
                _log(message)
                return False
            return True
        mode = _mode("DCT_KERNELS_CUDA")
        if mode == "0":
            _log("DCT_KERNELS_CUDA=0: not building the CUDA extension")
            return False
        self._nvcc = _find_nvcc()
        missing = [name for name, path in (("nvcc", self._nvcc), ("cmake", self._cmake))
                   if not path]
        if missing:
            message = (f"{' and '.join(missing)} not found: building without the CUDA "
                       "extension (CUDA tensors will use the Triton backend)")
            if mode == "1":
                raise RuntimeError(f"DCT_KERNELS_CUDA=1 but {message}")
            _log(message)
            return False
        return True

    def _build_one(self, ext) -> bool:
        variable = "DCT_KERNELS_CPU" if ext.kind == "cpu" else "DCT_KERNELS_CUDA"
        what = "cpu" if ext.kind == "cpu" else "CUDA"
        try:
            self._cmake_build(ext)
            return True
        except Exception as exc:  # noqa: BLE001  (any build failure)
            if _mode(variable) == "1":
                raise RuntimeError(f"{variable}=1 but building the {what} extension failed: "
                                   f"{exc}") from exc
            fallback = "the torch backend" if ext.kind == "cpu" else "the Triton backend"
            _log(f"building the {what} extension failed ({exc}); installing without it "
                 f"({'CPU' if ext.kind == 'cpu' else 'CUDA'} tensors will use {fallback}). "
                 f"Set {variable}=1 to make this an error.")
            return False

    def build_extension(self, ext):
        if ext.name not in self._built:  # run() builds every module that is wanted
            raise RuntimeError(f"{ext.name} was not built")

    def _cmake_build(self, ext):
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, f"cmake-{ext.kind}"))
        os.makedirs(build_dir, exist_ok=True)
        configure = [
            self._cmake, "-S", ROOT, "-B", build_dir,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDCT_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ext.kind == "cpu":
            sanitize = _mode("DCT_KERNELS_SANITIZE") == "1"
            configure += ["-DDCT_BUILD_CPU=ON", "-DDCT_BUILD_CUDA=OFF",
                          f"-DDCT_SANITIZE={'ON' if sanitize else 'OFF'}"]
            _log("building the cpu extension with the host C++ compiler"
                 + (" (sanitizers: address, undefined)" if sanitize else ""))
        else:
            arch = os.environ.get("DCT_KERNELS_CUDA_ARCH") or _default_arch()
            configure += ["-DDCT_BUILD_CPU=OFF", "-DDCT_BUILD_CUDA=ON",
                          f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
                          f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
            _log(f"building the CUDA extension for CUDA architectures {arch} with {self._nvcc}")
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
        subprocess.run(configure, check=True)
        subprocess.run([self._cmake, "--build", build_dir, "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("dct_kernels._cpu", "cpu"),
                   CMakeExtension("dct_kernels._cuda", "cuda")],
      cmdclass={"build_ext": CMakeBuild})
