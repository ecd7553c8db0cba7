"""tierserve's Python client SDK: classify images through the `digits` router, sync or asyncio, gRPC or HTTP."""

from tierserve.client.classification import Classification, TierserveError
from tierserve.client.clients import AsyncTierserveClient, TierserveClient

__all__ = ["AsyncTierserveClient", "Classification", "TierserveClient", "TierserveError"]
