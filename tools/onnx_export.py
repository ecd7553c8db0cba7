"""Export fitted scikit-learn classifiers to ONNX with the runner convention: `pixels` [N, 64] in,
`probabilities` [N, 10] out."""

from __future__ import annotations

from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline

ONNX_OPSET = 17


def to_onnx(model: BaseEstimator) -> bytes:
    """The serialized ONNX graph of a classifier (or a pipeline ending in one)."""
    classifier = model.steps[-1][1] if isinstance(model, Pipeline) else model
    graph = convert_sklearn(
        model,
        initial_types=[("pixels", FloatTensorType([None, 64]))],
        options={id(classifier): {"zipmap": False}},  # plain [N, 10] tensor instead of a list of dicts
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
    )
    return graph.SerializeToString()
