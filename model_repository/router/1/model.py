"""router: resizes each image to 8x8 and chooses the model that answers each row, by ../policy.yaml."""

from tierserve.triton_router_model import TritonPythonModel  # noqa: F401
