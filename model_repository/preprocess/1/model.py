"""preprocess: resizes any 4x4-64x64 image to the native 8x8 and reports how it looked as sent."""

from tierserve.triton_preprocess_model import TritonPythonModel  # noqa: F401
