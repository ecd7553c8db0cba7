"""TierserveClient and AsyncTierserveClient: `classify` over gRPC or HTTP with the official tritonclient."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from tierserve.client.classification import (
    MODEL,
    OUTPUTS,
    Classification,
    TierserveError,
    as_pixels,
    decode,
    request_parameters,
)
from tierserve.signature import TIERS, triton_priority

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def _module(protocol: str, asyncio: bool) -> ModuleType:
    """tritonclient.grpc, tritonclient.http or their .aio twins, imported only when used."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}{'.aio' if asyncio else ''}")


def _request(module: ModuleType, images: Any, tier: str | None, user_id: str | None,
             deadline_ms: int | None) -> dict[str, Any]:
    pixels = as_pixels(images)
    tensor = module.InferInput("PIXELS", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return {
        "model_name": MODEL,
        "inputs": [tensor],
        "outputs": [module.InferRequestedOutput(name) for name in OUTPUTS],
        "parameters": request_parameters(tier, user_id, deadline_ms) or None,
        # the tier's Triton priority orders the queues of `digits`' steps; no tier: the default level
        "priority": triton_priority(tier) if tier in TIERS else 0,
    }


@contextlib.contextmanager
def _server_errors() -> Iterator[None]:
    try:
        yield
    except InferenceServerException as error:
        raise TierserveError(str(error.status()), error.message() or str(error)) from None


class TierserveClient:
    """Blocking client: `TierserveClient("localhost:8001").classify(images, tier="critical")`."""

    def __init__(self, url: str | None = None, protocol: str = "grpc") -> None:
        self._module = _module(protocol, asyncio=False)
        self._client = self._module.InferenceServerClient(url or DEFAULT_URLS[protocol])

    def classify(self, images: np.ndarray, *, tier: str | None = None, user_id: str | None = None,
                 deadline_ms: int | None = None) -> list[Classification]:
        """Classify [N, H, W] images (or one [H, W]); raises TierserveError when the server refuses."""
        request = _request(self._module, images, tier, user_id, deadline_ms)
        with _server_errors():
            return decode(self._client.infer(**request))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TierserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTierserveClient:
    """asyncio client: `await AsyncTierserveClient("localhost:8001").classify(images)`."""

    def __init__(self, url: str | None = None, protocol: str = "grpc") -> None:
        self._module = _module(protocol, asyncio=True)
        self._client = self._module.InferenceServerClient(url or DEFAULT_URLS[protocol])

    async def classify(self, images: np.ndarray, *, tier: str | None = None, user_id: str | None = None,
                       deadline_ms: int | None = None) -> list[Classification]:
        """Classify [N, H, W] images (or one [H, W]); raises TierserveError when the server refuses."""
        request = _request(self._module, images, tier, user_id, deadline_ms)
        with _server_errors():
            return decode(await self._client.infer(**request))

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncTierserveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
