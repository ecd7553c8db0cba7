"""Export trained classifiers to ONNX with the runner convention: `pixels` [N, 64] in, `probabilities` [N, 10]
out. scikit-learn models go through skl2onnx, torch modules through torch.onnx."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline

if TYPE_CHECKING:
    from torch import nn

ONNX_OPSET = 17
# torch.onnx's exporter (dynamo=True, the default since torch 2.9) writes opset 18 natively; asked for 17 it
# converts its graph down afterwards. ONNX Runtime runs both.
TORCH_ONNX_OPSET = 18


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


def torch_to_onnx(module: nn.Module) -> bytes:
    """The serialized ONNX graph of a module mapping pixels [N, 64] to probabilities [N, 10], for any N.

    The dynamo exporter (torch.export + onnxscript) is used: the TorchScript one (dynamo=False) still works in
    torch 2.13 but warns that it will be removed. Both gave the same probabilities to 1e-8.
    """
    import torch  # deferred: only the torch-trained models pay for the import

    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            (torch.zeros(2, 64),),
            dynamo=True,
            verbose=False,
            input_names=["pixels"],
            output_names=["probabilities"],
            opset_version=TORCH_ONNX_OPSET,
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}},
        )
    buffer = io.BytesIO()
    program.save(buffer)
    graph = onnx.load_from_string(buffer.getvalue())
    # the exporter records each node's Python stack trace (paths and line numbers of this checkout): dropped,
    # so the artifact, and its hash, depend on the network alone
    for item in [*graph.graph.node, *graph.graph.input, *graph.graph.output, *graph.graph.value_info]:
        del item.metadata_props[:]
    return graph.SerializeToString()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs that torchvision's operators are unavailable (none are used) and torch.export warns
    about its own deprecated internals: noise in every build's output, silenced for the export only."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)
