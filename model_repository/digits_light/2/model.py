"""digits_light version 2: the shared runner model serves the artifact named in this folder's manifest.json."""

from tierserve.triton_runner_model import TritonPythonModel  # noqa: F401
