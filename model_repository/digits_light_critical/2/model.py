"""digits_light_critical version 2: digits_light's version 2, on capacity reserved for critical rows."""

from tierserve.triton_runner_model import TritonPythonModel  # noqa: F401
