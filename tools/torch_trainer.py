"""The torch-trained heavy model: a small CNN on 8x8 digits, trained on the perturbations clients send.

Only `tierserve build` imports this module: the served model is its ONNX export, run by ONNX Runtime, so no
Triton stub ever imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from tierserve.pixels import IMAGE_SHAPE, NUM_CLASSES, PIXEL_MAX
from tierserve.resize import area_weights
from tierserve.tools.dataset import DigitsSplit

# One thread: the same float sums whatever the machine's core count, and no stall when the build shares the
# cores (two threads trained ~1.4x faster on this 2-core machine, but one such run took 230 s instead of 14 s
# while other processes were busy).
TRAIN_THREADS = 1


@dataclass(frozen=True)
class Schedule:
    """How a network trains: the augmentation of each epoch's images and the optimiser's schedule."""

    epochs: int
    batch: int
    learning_rate: float
    weight_decay: float
    max_shift: int  # random translations of up to this many pixels in each direction
    noise_sigma: float  # Gaussian noise of 0 to this many pixel levels
    rescale_sides: tuple[int, ...]  # sizes an image is upscaled to and resized back from, as preprocess does

    @classmethod
    def from_recipe(cls: type[RecipeType], recipe: dict[str, Any]) -> RecipeType:
        """A manifest's recipe as this type: every key but `trainer` must name one of its fields, and every field."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k != "trainer"}
        return cls(**values)


RecipeType = TypeVar("RecipeType", bound=Schedule)


@dataclass(frozen=True)
class CnnRecipe(Schedule):
    """What a manifest's recipe says about the CNN and its training."""

    channels: tuple[int, int]  # convolution channels at 8x8 and at 4x4
    hidden: int  # width of the dense layer before the 10 outputs
    dropout: float  # before each dense layer, in training only


@dataclass(frozen=True)
class DistilledMlpRecipe(Schedule):
    """What a manifest's recipe says about a distilled MLP: its teacher, its size and how it weighs the two targets."""

    teacher: str  # the model version (name:version) whose probabilities it learns
    hidden: int
    temperature: float
    hard_weight: float  # the weight of the true labels' loss; the teacher's has 1 - hard_weight


class DigitsCnn(nn.Module):
    """Raw pixels [N, 64] (0-16) in, class probabilities [N, 10] out: the runner convention of every model.

    Two 3x3 convolutions at 8x8, max-pool, two at 4x4, max-pool, then a dense layer: ~60% of the parameters
    of digits_heavy:2's MLP and ~9x its multiply-adds, as each weight is applied at every position, so a
    stroke moved by a pixel or two still reads as the same stroke.
    """

    def __init__(self, channels: tuple[int, int], hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        wide, wider = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, wide, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(wide, wide, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(wide, wider, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(wider, wider, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(wider * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 8, 8] pixels 0-16 -> [N, 10] logits."""
        return self.classifier(self.features(images.reshape(-1, 1, *IMAGE_SHAPE) / PIXEL_MAX))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixels), dim=1)

    def multiply_adds(self) -> int:
        """Multiply-adds for one image: every convolution weight at every output pixel, plus the dense layers."""
        total, side = 0, IMAGE_SHAPE[0]
        for layer in [*self.features, *self.classifier]:
            if isinstance(layer, nn.Conv2d):
                total += layer.weight.numel() * side * side
            elif isinstance(layer, nn.MaxPool2d):
                side //= 2
            elif isinstance(layer, nn.Linear):
                total += layer.weight.numel()
        return total


@contextlib.contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Fixed seed, thread count and deterministic kernels for the block; the caller's settings after it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


class Augmenter:
    """Random perturbations like those in the demo's workload (tierserve.tools.workload): shifts with
    vacated pixels 0, Gaussian noise clipped to 0-16, and non-integer upscaling undone by preprocess's
    area resize (integer factors come back exactly; 10x10 or 12x12 come back blurred and off-grid)."""

    def __init__(self, recipe: Schedule, generator: torch.Generator) -> None:
        self.recipe = recipe
        self.generator = generator
        side = IMAGE_SHAPE[0]
        # nearest-neighbour upscaling to `s`, then area resize back to 8: one [8, 8] matrix per side
        self.rescales = torch.stack(
            [
                torch.from_numpy((area_weights(s, side) @ np.eye(side)[np.arange(s) * side // s]).astype(np.float32))
                for s in recipe.rescale_sides
            ]
        )

    def _uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self.generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count, side = len(images), IMAGE_SHAPE[0]
        # a quarter keep their pixels, the rest get each perturbation with probability 1/2
        perturbed = self._uniform(count) >= 0.25
        rescale = perturbed & (self._uniform(count) < 0.5)
        which = torch.randint(len(self.rescales), (count,), generator=self.generator)
        matrices = torch.where(rescale[:, None, None], self.rescales[which], torch.eye(side))
        images = matrices @ images @ matrices.transpose(1, 2)

        shift = self.recipe.max_shift
        offsets = torch.randint(-shift, shift + 1, (count, 2), generator=self.generator)
        offsets = torch.where((perturbed & (self._uniform(count) < 0.5))[:, None], offsets, 0) + shift
        padded = functional.pad(images, (shift, shift, shift, shift))
        grid = torch.arange(side)
        rows = (offsets[:, 0, None] + grid)[:, :, None]
        cols = (offsets[:, 1, None] + grid)[:, None, :]
        images = padded[torch.arange(count)[:, None, None], rows, cols]

        noisy = perturbed & (self._uniform(count) < 0.5)
        sigma = torch.where(noisy, self._uniform(count) * self.recipe.noise_sigma, 0.0)
        noise = torch.randn(images.shape, generator=self.generator) * sigma[:, None, None]
        return (images + noise).clamp(0.0, PIXEL_MAX)


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (network, perturbed images, labels) -> loss
Network = TypeVar("Network", bound=nn.Module)


def _fit(split: DigitsSplit, seed: int, recipe: Schedule, make: Callable[[], Network], loss: Loss) -> Network:
    """A network made by `make`, trained on the training images freshly perturbed every epoch (the augmentation and
    schedule of `recipe`); the same seed gives the same weights on the same machine and library versions."""
    with _reproducible(seed):
        generator = torch.Generator().manual_seed(seed)
        augment = Augmenter(recipe, generator)
        model = make()
        images = torch.from_numpy(split.train.images)
        labels = torch.from_numpy(split.train.labels)
        steps_per_epoch = -(-len(images) // recipe.batch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch
        )
        model.train()
        for _ in range(recipe.epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), recipe.batch):
                batch = order[start : start + recipe.batch]
                step_loss = loss(model, augment(images[batch]), labels[batch])
                optimizer.zero_grad()
                step_loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()


def train_cnn(split: DigitsSplit, seed: int, recipe: CnnRecipe) -> DigitsCnn:
    """The CNN trained on the training images, freshly perturbed every epoch; the same seed gives the same
    weights on the same machine and library versions."""
    return _fit(
        split,
        seed,
        recipe,
        lambda: DigitsCnn(recipe.channels, recipe.hidden, recipe.dropout),
        lambda network, images, labels: functional.cross_entropy(network.logits(images), labels),
    )


class DigitsMlp(nn.Module):
    """Raw pixels [N, 64] (0-16) in, class probabilities [N, 10] out: one hidden layer, a fast first stage's size."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images.reshape(-1, 64) / PIXEL_MAX)  # -1: any batch size in the ONNX export

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixels), dim=1)

    def multiply_adds(self) -> int:
        return sum(layer.weight.numel() for layer in self.layers if isinstance(layer, nn.Linear))


def train_distilled_mlp(
    split: DigitsSplit,
    seed: int,
    recipe: Schedule,
    teacher: Callable[[np.ndarray], np.ndarray],
    hidden: int,
    temperature: float = 2.0,
    hard_weight: float = 0.5,
) -> DigitsMlp:
    """An MLP of `hidden` units trained with `recipe`'s augmentation and schedule to match `teacher` (images [N, 8, 8]
    -> probabilities [N, 10]) on the same perturbed images: the soft targets at `temperature`, and the true labels
    with weight `hard_weight`."""

    def loss(network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        taught = torch.from_numpy(teacher(images.numpy())).clamp_min(1e-7).log() / temperature
        logits = network.logits(images)
        soft = functional.kl_div(
            functional.log_softmax(logits / temperature, dim=1),
            functional.log_softmax(taught, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return hard_weight * functional.cross_entropy(logits, labels) + (1 - hard_weight) * temperature**2 * soft

    return _fit(split, seed, recipe, lambda: DigitsMlp(hidden), loss)


def predict_proba(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The trained network's own probabilities for [N, 8, 8] images, as float32 [N, 10]."""
    with torch.inference_mode():
        return model(torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))).numpy()
