"""feedback: takes a client's true label for the REQUEST_ID of a digits answer (bandits, per-user adaptation)."""

from tierserve.triton_feedback_model import TritonPythonModel  # noqa: F401
