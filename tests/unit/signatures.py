"""A plain 8x8 standard-tier signature for unit tests, with the cues a test cares about changed."""

from __future__ import annotations

from tierserve.signature import Signature


def signature(**changes) -> Signature:
    fields = dict(
        height=8,
        width=8,
        missing_fraction=0.0,
        out_of_range_fraction=0.0,
        sparsity=0.5,
        ood_score=0.5,
        tier="standard",
        user_id="",
        deadline_ms=None,
    )
    return Signature(**{**fields, **changes})
