"""The TorchRec integration stays out of the way: importing dct_kernels or
dct_kernels.distributed never imports TorchRec, and dct_kernels.distributed.torchrec without a
loadable TorchRec raises an ImportError that names the versions that work together. Each case
runs in a fresh interpreter, so what this process imported does not count."""

import importlib.util
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ("torchrec 1.9.2", "fbgemm-gpu-cpu 1.9.0", "torch 2.14", "pip install --no-deps")


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_package_does_not_import_torchrec():
    out = _run("""
        import sys
        import dct_kernels, dct_kernels.distributed
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu")
                     or m == "dct_kernels.distributed.torchrec"))
        """)
    assert out.strip() == "[]"


def test_import_error_names_the_working_versions():
    # torchrec made unimportable (None in sys.modules), as where it is not installed or its
    # kernels fail to load.
    out = _run("""
        import sys
        sys.modules["torchrec"] = None
        try:
            import dct_kernels.distributed.torchrec
        except ImportError as error:
            print(error)
            print(type(error.__cause__).__name__)
        else:
            print("imported")
        """)
    message = out.strip()
    for text in VERSIONS:
        assert text in message, message
    assert "docs/torchrec.md" in message
    assert message.endswith("ModuleNotFoundError")  # the original failure is chained


def test_import_matches_what_is_installed():
    # Where torchrec is installed (the TorchRec environment) the module imports; elsewhere the
    # plain import fails with the same message. (tests/torchrec/, a namespace package when
    # tests/ is on sys.path, has no origin; the library has one.)
    spec = importlib.util.find_spec("torchrec")
    installed = spec is not None and spec.origin is not None
    out = _run("""
        try:
            from dct_kernels.distributed.torchrec import DCTDataParallelWrapper, dct_state
            print("imported", DCTDataParallelWrapper.__mro__[1].__name__)
        except ImportError as error:
            print("failed", error)
        """)
    if installed:
        assert out.strip() == "imported DefaultDataParallelWrapper", out
    else:
        assert out.startswith("failed") and all(text in out for text in VERSIONS), out
