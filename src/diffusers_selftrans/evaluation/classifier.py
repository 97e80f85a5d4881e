# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Small-data metrics (the digits quickstart and benchmark): a feature classifier trained on the real images.

A small CNN (seeded, cached by a hash of data + hyper-parameters) whose penultimate layer is the feature space of a
"feature-FID", and `class_accuracy`: how often it recognises the intended class of a conditional sample.
"""

import hashlib
import json
import os
import tempfile
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sampling import ImagesLike, to_uint8_nchw
from .metrics import compute_fid

# Bump when the classifier architecture or training changes, so old cache files are not reused.
_CLASSIFIER_VERSION = 1
# Pooled spatial grid before the feature layer.
_CLASSIFIER_POOL_SIZE = 4
# Our choices for the small-data classifier (no paper default exists): 16 px input covers digits (8 px originals)
# and keeps training at seconds on a CPU; 64 features keep the FID covariance well conditioned with ~1K samples.
_CLASSIFIER_INPUT_SIZE = 16
_CLASSIFIER_WIDTH = 16
_CLASSIFIER_NUM_FEATURES = 64
_CLASSIFIER_EPOCHS = 15
_CLASSIFIER_BATCH_SIZE = 128
_CLASSIFIER_LEARNING_RATE = 2e-3


class FeatureClassifier(nn.Module):
    """Small CNN classifier; its penultimate layer (`num_features` wide) is the feature space of the feature-FID.

    `forward(images)` returns features `(N, num_features)`; `logits(images)` the class logits. Images: uint8, or
    float in [0, 1], `(N, C, H, W)` at any size, resized to `input_size` (antialiased bilinear) so that training takes
    seconds on a CPU; 1- and 3-channel inputs are converted to `in_channels`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        num_features: int = _CLASSIFIER_NUM_FEATURES,
        width: int = _CLASSIFIER_WIDTH,
        input_size: int = _CLASSIFIER_INPUT_SIZE,
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            num_features=num_features,
            width=width,
            input_size=input_size,
        )
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(_CLASSIFIER_POOL_SIZE),
            nn.Flatten(),
            nn.Linear(4 * width * _CLASSIFIER_POOL_SIZE**2, num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)
        self.loaded_from_cache = False
        self.cache_path: Optional[str] = None
        self.train_accuracy: Optional[float] = None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        channels = self.config["in_channels"]
        if x.shape[1] != channels:
            if x.shape[1] == 3 and channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1 and channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"The classifier takes {channels}-channel images, got {x.shape[1]} channels.")
        size = self.config["input_size"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.5  # [0, 1] -> [-1, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def save_feature_classifier(classifier: FeatureClassifier, path: str) -> None:
    payload = {
        "config": classifier.config,
        "state_dict": classifier.state_dict(),
        "train_accuracy": classifier.train_accuracy,
        "version": _CLASSIFIER_VERSION,
    }
    fd, tmp_path = tempfile.mkstemp(suffix=".pt", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    torch.save(payload, tmp_path)
    os.replace(tmp_path, path)


def load_feature_classifier(path: str, map_location: Union[str, torch.device] = "cpu") -> FeatureClassifier:
    """Loads a classifier written by `save_feature_classifier` / `train_feature_classifier` (eval mode)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("version") != _CLASSIFIER_VERSION:
        raise ValueError(
            f"{path} was written by classifier version {payload.get('version')}, need {_CLASSIFIER_VERSION}."
        )
    classifier = FeatureClassifier(**payload["config"])
    classifier.load_state_dict(payload["state_dict"])
    classifier.train_accuracy = payload.get("train_accuracy")
    classifier.cache_path = path
    return classifier.eval()


def train_feature_classifier(
    images: ImagesLike,
    labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    epochs: int = _CLASSIFIER_EPOCHS,
    batch_size: int = _CLASSIFIER_BATCH_SIZE,
    learning_rate: float = _CLASSIFIER_LEARNING_RATE,
    num_features: int = _CLASSIFIER_NUM_FEATURES,
    width: int = _CLASSIFIER_WIDTH,
    input_size: int = _CLASSIFIER_INPUT_SIZE,
) -> FeatureClassifier:
    """Trains (seeded, CPU, seconds for ~2K small images) a `FeatureClassifier` on real images, or loads it from cache.

    With `cache_dir`, the weights are stored as `feature_classifier_<hash>.pt`, the hash covering the images, labels and
    every hyper-parameter; a later call with the same inputs loads the file (`classifier.loaded_from_cache` is True).
    """
    pixels = to_uint8_nchw(images)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if targets.ndim != 1 or len(targets) != len(pixels):
        raise ValueError(f"Need one label per image: {len(pixels)} images, labels of shape {tuple(targets.shape)}.")
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"Labels must lie in [0, {num_classes}).")
    hparams = dict(
        num_classes=num_classes, seed=seed, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        num_features=num_features, width=width, input_size=input_size, version=_CLASSIFIER_VERSION,
    )
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        digest.update(json.dumps(hparams, sort_keys=True).encode())
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.numpy().tobytes())
        digest.update(targets.numpy().astype(np.int64).tobytes())
        cache_path = os.path.join(cache_dir, f"feature_classifier_{digest.hexdigest()[:16]}.pt")
        if os.path.isfile(cache_path):
            classifier = load_feature_classifier(cache_path)
            classifier.loaded_from_cache = True
            return classifier

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        classifier = FeatureClassifier(pixels.shape[1], num_classes, num_features, width, input_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    classifier.train()
    inputs = classifier._prepare(pixels)  # resize and normalise once, not every step
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(pixels), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier.head(classifier.body(inputs[idx])), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval()
    classifier.train_accuracy = class_accuracy(classifier, pixels, targets)
    if cache_path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        save_feature_classifier(classifier, cache_path)
        classifier.cache_path = cache_path
    return classifier


@torch.no_grad()
def class_accuracy(
    classifier: FeatureClassifier,
    images: ImagesLike,
    labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    *,
    batch_size: int = 256,
) -> float:
    """Share of `images` that `classifier` assigns to their intended class `labels`."""
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(targets) != len(images):
        raise ValueError(f"Need one label per image: {len(images)} images, {len(targets)} labels.")
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = to_uint8_nchw(images[start : start + batch_size]).to(device)
        predicted = classifier.logits(batch).argmax(dim=1).cpu()
        correct += int((predicted == targets[start : start + batch_size]).sum())
    return correct / max(len(targets), 1)


def evaluate_samples(
    real_images: ImagesLike,
    real_labels: Optional[Union[Sequence[int], np.ndarray, torch.Tensor]],
    fake_images: ImagesLike,
    fake_labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    classifier: FeatureClassifier,
    *,
    batch_size: int = 256,
) -> Dict[str, float]:
    """Feature-FID (classifier features) and class accuracy of conditional samples.

    Returns `fid`, `accuracy` (intended class recognised), `real_accuracy` (the same classifier on the real images,
    when `real_labels` is given: the ceiling of `accuracy`), `num_real`, `num_fake`.
    """
    fid = compute_fid(real_images, fake_images, feature_extractor=classifier, batch_size=batch_size)
    result = {
        "fid": fid,
        "accuracy": class_accuracy(classifier, fake_images, fake_labels, batch_size=batch_size),
        "num_real": len(real_images),
        "num_fake": len(fake_images),
    }
    if real_labels is not None:
        result["real_accuracy"] = class_accuracy(classifier, real_images, real_labels, batch_size=batch_size)
    return result
