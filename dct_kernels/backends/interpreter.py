"""Whether Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) rather than compiled.

A module of its own so that the backend registry and the triton package both import it from here
(the triton package importing it back from the registry would be an import cycle).
"""

import os


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET is set to anything but "" or "0": Triton kernels then run as
    numpy code on CPU tensors (one program at a time), which is how tests run them without a
    GPU. Read at every call; Triton itself reads it when the kernels are decorated."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
