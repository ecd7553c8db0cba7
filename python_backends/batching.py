"""Serve a dynamic batch of requests with one runner call: validate each, run the valid rows together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tierserve.pixels import bounded, pixel_problem
from tierserve.runners import Runner


@dataclass(frozen=True)
class Rejected:
    """A request that was not run, and why."""

    message: str


def infer_batched(runner: Runner, batches: Sequence[np.ndarray]) -> list[np.ndarray | Rejected]:
    """Probabilities for each request's batch, or why it was rejected; one `runner.infer` for all valid rows.

    Triton's dynamic batcher hands several requests to one execute call; running their rows as one
    matrix is what makes batching pay. A bad request is rejected alone and never fails its neighbours.
    """
    problems = [pixel_problem(batch, runner.accepts_missing) for batch in batches]
    valid = [batch for batch, problem in zip(batches, problems, strict=True) if problem is None]
    if valid:
        probs = runner.infer(bounded(np.concatenate(valid).astype(np.float32, copy=False)))
        split_at = np.cumsum([len(batch) for batch in valid])[:-1]
        answers = iter(np.split(probs, split_at))
    return [Rejected(problem) if problem else _finite(next(answers)) for problem in problems]


def _finite(probs: np.ndarray) -> np.ndarray | Rejected:
    """A request's probabilities, or its refusal: NaN or infinite probabilities are never an answer."""
    if np.isfinite(probs).all():
        return probs
    return Rejected(
        f"the model's probabilities for {int((~np.isfinite(probs).all(axis=1)).sum())} image(s) are "
        "not finite; pixels should be 0-16"
    )


def infer_rows(runner: Runner, images: np.ndarray) -> np.ndarray | Rejected:
    """Probabilities for one call's rows as `runner` gives them (a non-finite row is the caller's to judge), or
    why the call was rejected: what a model served through Triton answers, for a model the router runs itself."""
    if problem := pixel_problem(images, runner.accepts_missing):
        return Rejected(problem)
    return runner.infer(bounded(images.astype(np.float32, copy=False)))
