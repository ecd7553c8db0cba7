"""router: chooses the model that answers each row, by the policy in ../policy.yaml."""

from tierserve.triton_router_model import TritonPythonModel  # noqa: F401
