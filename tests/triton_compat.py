"""Test set-up shim: Triton 3.6's CPU interpreter under numpy >= 2.4.

Triton's interpreter turns a scalar tensor into a Python int (loop bounds of ``range`` in
a kernel, for instance) with ``int(handle.data)``, where ``handle.data`` is a one-element
1-D numpy array. numpy 2.4 refuses that conversion ("only 0-dimensional arrays can be
converted to Python scalars"), so every kernel with a runtime loop bound fails in the
interpreter of triton < 3.7, which fixed it by squeezing the array first. The GPU machine
this project is benchmarked on has triton 3.6 and numpy 2.5, whose packages cannot be
changed, so the tests apply that same fix to the old interpreter instead of pinning numpy.

Only the interpreter is touched, and only while a test session runs: compiled kernels
(and fastbn itself) never see this.
"""

from __future__ import annotations


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def needs_index_shim(triton_version: str, numpy_version: str) -> bool:
    """Whether this triton's interpreter breaks on this numpy (triton < 3.7, numpy >= 2.4)."""
    return _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4)


def patch_interpreter_index() -> bool:
    """Make the interpreter's scalar-to-int conversion squeeze first; True when patched."""
    import numpy
    import triton

    if not needs_index_shim(triton.__version__, numpy.__version__):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
