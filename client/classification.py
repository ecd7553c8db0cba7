"""What a `digits` request carries and what comes back, independent of protocol and sync/async; and the
`feedback` call that says which label a classified image really had."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTPUTS = ("LABEL", "PROBS", "CONFIDENCE", "ROUTE", "REASON", "PATH", "REQUEST_ID", "ARMS")
MODEL = "digits"
FEEDBACK_MODEL = "feedback"
FEEDBACK_OUTPUTS = ("ACCEPTED",)
CONTEXT_PARAMETERS = ("tier", "user_id", "deadline_ms")  # what classify's own arguments set; never an attribute


@dataclass(frozen=True)
class Classification:
    """One image's answer: the label, the class probabilities, which route answered and why, and the id that
    feedback on it quotes."""

    label: int
    probs: np.ndarray
    confidence: float
    route: str  # model:version that produced the answer
    reason: str  # the rule or cascade decision and the cues behind it
    path: str  # every model tried, in order, with its outcome
    request_id: str = ""  # signed by the server; pass it unchanged to `feedback`
    arms: Mapping[str, str] = field(default_factory=dict)  # experiment -> arm ("mirrored" for a shadow experiment)


def as_pixels(images: Any) -> np.ndarray:
    """Images as the server wants them: float32 [N, H, W]; a single [H, W] image becomes N = 1."""
    pixels = np.asarray(images, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise ValueError(f"images must be [H, W] or [N, H, W], got shape {list(pixels.shape)}")
    return pixels


def request_parameters(
    tier: str | None,
    user_id: str | None,
    deadline_ms: int | None,
    attributes: Mapping[str, str | int] | None = None,
) -> dict[str, Any]:
    """The KServe parameters the router reads: unset ones are left out so the policy's defaults apply, and request
    attributes (those policy.yaml declares, for experiments) go as parameters of their own names, ints as ints."""
    attributes = dict(attributes or {})
    if reserved := sorted(set(attributes) & set(CONTEXT_PARAMETERS)):
        raise ValueError(f"attribute {reserved[0]!r} is not an attribute: pass it as classify's own argument")
    for name, value in attributes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"attribute names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"attribute {name!r} must be a string or an int, got {value!r}")
    parameters = {"tier": tier, "user_id": user_id, "deadline_ms": deadline_ms, **attributes}
    return {name: value for name, value in parameters.items() if value is not None}


def parse_arms(text: str) -> dict[str, str]:
    """The ARMS output as experiment -> arm: "split=b,mirror=mirrored" -> {"split": "b", "mirror": "mirrored"}."""
    return dict(pair.split("=", 1) for pair in text.split(",")) if text else {}


def decode(result: Any) -> list[Classification]:
    """Classifications from a tritonclient InferResult (gRPC or HTTP, sync or asyncio)."""
    out = {name: result.as_numpy(name) for name in OUTPUTS}
    return [
        Classification(
            int(out["LABEL"][i, 0]),
            out["PROBS"][i],
            float(out["CONFIDENCE"][i, 0]),
            out["ROUTE"][i, 0].decode(),
            out["REASON"][i, 0].decode(),
            out["PATH"][i, 0].decode(),
            out["REQUEST_ID"][i, 0].decode(),
            parse_arms(out["ARMS"][i, 0].decode()),
        )
        for i in range(len(out["LABEL"]))
    ]


def feedback_tensors(request_ids: str | Sequence[str], labels: int | Sequence[int]) -> dict[str, np.ndarray]:
    """The `feedback` model's inputs: REQUEST_ID BYTES [N, 1] and LABEL INT64 [N, 1], one row per id."""
    ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
    truths = [labels] if isinstance(labels, int | np.integer) else list(labels)
    if not ids or len(ids) != len(truths):
        counts = f"got {len(ids)} ids and {len(truths)} labels"
        raise ValueError(f"feedback takes one label per request id, at least one: {counts}")
    if bad := [i for i in ids if not isinstance(i, str) or not i]:
        raise ValueError(f"request ids are the non-empty REQUEST_ID strings of answers, got {bad[0]!r}")
    if bad := [t for t in truths if isinstance(t, bool) or not isinstance(t, int | np.integer)]:
        raise ValueError(f"labels must be ints, got {bad[0]!r}")
    return {
        "REQUEST_ID": np.array([[i.encode()] for i in ids], dtype=np.object_),
        "LABEL": np.array([[t] for t in truths], dtype=np.int64),
    }


def unaccepted(result: Any) -> list[int]:
    """The rows of a `feedback` call the server did not accept (it refuses a call with an error, so none)."""
    return [int(i) for i in np.flatnonzero(~result.as_numpy("ACCEPTED").astype(bool).reshape(-1))]
