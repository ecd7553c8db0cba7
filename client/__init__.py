"""tierserve's Python client SDK: classify images through the `digits` router, sync or asyncio, gRPC or HTTP."""

from tierserve.client.classification import Classification
from tierserve.client.clients import AsyncTierserveClient, TierserveClient
from tierserve.client.errors import TierserveError

__all__ = ["AsyncTierserveClient", "Classification", "TierserveClient", "TierserveError"]
