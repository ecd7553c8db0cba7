"""preprocess: resizes any 4x4-64x64 image to the native 8x8 (the first step of the static ensemble)."""

from tierserve.triton_preprocess_model import TritonPythonModel  # noqa: F401
