"""Deterministic trainers for the reference models; each returns a fitted scikit-learn estimator or runner."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tierserve.pixels import NUM_CLASSES
from tierserve.runners import CentroidRunner
from tierserve.tools.dataset import DigitsSplit, mask_pixels, shifted_copies


def train_mlp(split: DigitsSplit, seed: int, hidden: list[int], alpha: float, epochs: int) -> Pipeline:
    """The accurate model: a wide multi-layer perceptron on standardised pixels, trained on the
    training images and their one-pixel shifts."""
    images = shifted_copies(split.train.images)
    labels = np.tile(split.train.labels, len(images) // len(split.train.labels))
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=tuple(hidden), alpha=alpha, max_iter=epochs, random_state=seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed epoch budget is the recipe
        return model.fit(images.reshape(len(images), -1), labels)


def distill_logistic(split: DigitsSplit, teacher_probs: np.ndarray, temperature: float) -> Pipeline:
    """The fast model: multinomial logistic regression fitted to the teacher's softened probabilities.

    Repeating every image once per class, weighted by the teacher's probability of that class, makes
    the ordinary weighted log-loss equal to the cross-entropy against the teacher's soft labels.
    """
    soft = np.exp(np.log(np.clip(teacher_probs, 1e-7, 1.0)) / temperature)
    soft /= soft.sum(axis=1, keepdims=True)
    images = np.repeat(split.train.flat, NUM_CLASSES, axis=0)
    labels = np.tile(np.arange(NUM_CLASSES), len(split.train.flat))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    return model.fit(images, labels, logisticregression__sample_weight=soft.reshape(-1))


def train_missing_gbdt(split: DigitsSplit, seed: int, iterations: int) -> HistGradientBoostingClassifier:
    """The missing-pixel specialist: gradient-boosted trees, which learn where NaN goes at every split.

    It trains on the clean images plus copies with 10-60% of the pixels removed, so missing pixels are
    seen in training rather than only at serving time.
    """
    fractions = (0.1, 0.3, 0.45, 0.6)
    masked = [mask_pixels(split.train.images, f, seed + i) for i, f in enumerate(fractions)]
    images = np.concatenate([split.train.images, *masked]).reshape(-1, 64)
    labels = np.tile(split.train.labels, 1 + len(fractions))
    model = HistGradientBoostingClassifier(
        max_iter=iterations, learning_rate=0.1, max_leaf_nodes=15, early_stopping=False, random_state=seed
    )
    return model.fit(images, labels)


def fit_centroids(split: DigitsSplit) -> CentroidRunner:
    """The rule-based safe default: class centroids, with a temperature calibrated on the validation split."""
    centroids = np.stack([split.train.flat[split.train.labels == k].mean(axis=0) for k in range(NUM_CLASSES)])
    runner = CentroidRunner(centroids, temperature=1.0)
    best_loss, best_temperature = np.inf, 1.0
    for temperature in np.geomspace(0.1, 100.0, 200):
        runner.temperature = float(temperature)
        probs = runner.infer(split.validation.images)
        loss = -np.log(np.clip(probs[np.arange(len(probs)), split.validation.labels], 1e-12, 1.0)).mean()
        if loss < best_loss:
            best_loss, best_temperature = loss, float(temperature)
    runner.temperature = best_temperature
    return runner
