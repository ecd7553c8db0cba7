"""digits_heavy_critical version 3: digits_heavy's version 3, on capacity reserved for critical rows (served once
the version_policy in ../config.pbtxt lists it)."""

from tierserve.triton_runner_model import TritonPythonModel  # noqa: F401
