# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Image metrics: FID, sFID, Inception Score and precision/recall, on any feature extractor or on Inception.

Inception metrics run torch-fidelity's InceptionV3 with the TF-2015 weights, through torchmetrics. Never downloads:
the weights come from `inception_weights` or the torch hub cache. Images are resized to 299 with the TF1-compatible
bilinear resize (`antialias=False`), which is what makes the numbers comparable with papers (ADM evaluator);
torchmetrics' default `antialias=True` is not.
"""

import importlib.util
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .sampling import ImagesLike, to_uint8_nchw

# torch-fidelity `feature_extractor_inceptionv3.py` `URL_INCEPTION_V3`: the TF-2015 Inception weights in PyTorch form.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# ADM evaluator: sFID uses `mixed_6/conv:0` (= torch-fidelity `Mixed_6d.branch1x1`, after ReLU), first 7 channels.
SPATIAL_FEATURE_CHANNELS = 7
# ADM evaluator: Inception Score over splits of 5000 samples (10 splits for 50K samples).
INCEPTION_SCORE_SPLITS = 10
# Improved precision/recall (Kynkaenniemi et al. 2019) as in the ADM evaluator's `ManifoldEstimator`: k = 3.
PRECISION_RECALL_K = 3


@torch.no_grad()
def extract_features(
    extractor: nn.Module, images: ImagesLike, *, batch_size: int = 64, device: Union[str, torch.device, None] = None
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Runs `extractor` on uint8 `(B, C, H, W)` batches; returns its (float32, CPU) output for all images.

    The extractor receives uint8 images (the torch-fidelity/torchmetrics convention) and returns `(B, D)` or a dict
    of such tensors.
    """
    if device is not None:
        extractor = extractor.to(device)
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    total = len(images)
    outputs: List[Any] = []
    for start in range(0, total, batch_size):
        batch = to_uint8_nchw(images[start : start + batch_size]).to(device)
        outputs.append(extractor(batch))
    if not outputs:
        raise ValueError("No images to extract features from.")
    if isinstance(outputs[0], dict):
        return {key: torch.cat([o[key].float().cpu() for o in outputs]) for key in outputs[0]}
    return torch.cat([o.float().cpu() for o in outputs])


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID consume features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `(N, D)` (torchmetrics' FID, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"Need two (N, D) feature sets, got {tuple(real_features.shape)} and {tuple(fake_features.shape)}."
        )
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real_features.shape[1]))
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # Distance of each point to its k-th nearest neighbour in the same set (k + 1: the point itself is at 0).
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)]
    return torch.cat(radii)


def _fraction_inside(ref: torch.Tensor, ref_radii: torch.Tensor, query: torch.Tensor, batch_size: int) -> float:
    inside = [(torch.cdist(chunk, ref) <= ref_radii[None]).any(dim=1) for chunk in query.split(batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = PRECISION_RECALL_K, batch_size: int = 1024
) -> Dict[str, float]:
    """Improved precision/recall (Kynkaenniemi et al. 2019; ADM evaluator): k-NN balls around each set.

    precision: share of fake samples inside some real k-NN ball; recall: share of real samples inside some fake ball.
    """
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} samples per set.")
    real, fake = real_features.float(), fake_features.float()
    precision = _fraction_inside(real, _knn_radii(real, k, batch_size), fake, batch_size)
    recall = _fraction_inside(fake, _knn_radii(fake, k, batch_size), real, batch_size)
    return {"precision": precision, "recall": recall}


def inception_score(
    logits: torch.Tensor, *, splits: int = INCEPTION_SCORE_SPLITS, seed: int = 0
) -> Tuple[float, float]:
    """Inception Score (mean, std over splits) from unbiased Inception logits, via torchmetrics' `InceptionScore`."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_PrecomputedFeatures(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):  # torchmetrics shuffles with the global RNG: keep the score reproducible
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)



def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def resolve_inception_weights(inception_weights: Optional[str] = None) -> str:
    """Path of the Inception weights: `inception_weights`, else the torch hub cache; a clear error if absent."""
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise FileNotFoundError(
                f"Inception weights not found at {inception_weights}. Download {INCEPTION_WEIGHTS_URL} there "
                "(FID/IS/sFID also need `pip install torch-fidelity`, i.e. `pip install diffusers-selftrans[metrics]`)."
            )
        return inception_weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME)
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"Inception weights not found at {cached} (the torch hub cache, $TORCH_HOME/hub/checkpoints). "
            f"This code never downloads: fetch {INCEPTION_WEIGHTS_URL} and put it at that path or pass its location with "
            "`inception_weights` / `--inception_weights`. Inception metrics also need "
            "`pip install torch-fidelity` (`pip install diffusers-selftrans[metrics]`)."
        )
    return cached


class InceptionFeatureExtractor(nn.Module):
    """torch-fidelity's InceptionV3 (TF-2015 weights) giving pool (2048), spatial (sFID) and unbiased-logit features.

    Input: uint8 `(N, 3, H, W)` at any size (resized to 299 inside). Output: dict with `pool` `(N, 2048)` (FID,
    precision/recall), `spatial` `(N, 7 * 17 * 17)` (sFID: `mixed_6/conv`, first 7 channels, flattened channel-last as
    the ADM evaluator) and `logits` `(N, 1008)` (Inception Score, no bias as ADM and torch-fidelity).
    `antialias=False` (default) uses the TF1-compatible resize for paper-comparable numbers.
    """

    def __init__(self, inception_weights: Optional[str] = None, antialias: bool = False):
        super().__init__()
        weights = resolve_inception_weights(inception_weights)
        if not _torch_fidelity_available():
            raise ImportError(
                "Inception metrics (FID, sFID, IS, precision/recall) need torch-fidelity, which is not installed: "
                "`pip install diffusers-selftrans[metrics]` (or `pip install torch-fidelity`; it needs a torchvision "
                "that matches your torch). Without it, pass `feature_extractor=<nn.Module>` "
                "(e.g. a feature classifier)."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights,
            antialias=antialias,
        )
        self._spatial: Optional[torch.Tensor] = None
        # TF `mixed_6` is the 4th 17x17 block, torch-fidelity's `Mixed_6d`; `conv` is its 1x1 branch (post-ReLU).
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_FEATURE_CHANNELS].permute(0, 2, 3, 1).flatten(1).clone()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise ValueError("InceptionFeatureExtractor expects uint8 images; convert with `to_uint8_nchw`.")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pool = self.net(images)  # public forward: the first (only) listed feature, (N, 2048)
        # torch-fidelity's "logits_unbiased", computed as it does (`x.mm(self.fc.weight.T)`) from the pool features
        logits = pool.mm(self.net.fc.weight.T)
        return {"pool": pool, "spatial": self._spatial, "logits": logits}


def compute_fid(
    real: ImagesLike,
    fake: ImagesLike,
    feature_extractor: Optional[nn.Module] = None,
    inception_weights: Optional[str] = None,
    *,
    batch_size: int = 64,
    device: Union[str, torch.device, None] = None,
    antialias: bool = False,
) -> float:
    """FID between two image sets.

    With `feature_extractor` (an `nn.Module` taking uint8 `(N, C, H, W)`, returning `(N, D)`) it runs fully offline.
    Without it, the Inception pool features with weights from `inception_weights` or the torch hub cache (needs
    torch-fidelity); `antialias=False` gives the paper-comparable (TF-compatible) resize.
    """
    if feature_extractor is None:
        extractor = InceptionFeatureExtractor(inception_weights, antialias=antialias)
        real_f = extract_features(extractor, real, batch_size=batch_size, device=device)["pool"]
        fake_f = extract_features(extractor, fake, batch_size=batch_size, device=device)["pool"]
    else:
        real_f = extract_features(feature_extractor, real, batch_size=batch_size, device=device)
        fake_f = extract_features(feature_extractor, fake, batch_size=batch_size, device=device)
    return frechet_distance(real_f, fake_f)


def compute_inception_metrics(
    real: Optional[ImagesLike],
    fake: ImagesLike,
    inception_weights: Optional[str] = None,
    *,
    batch_size: int = 64,
    device: Union[str, torch.device, None] = None,
    antialias: bool = False,
    k: int = PRECISION_RECALL_K,
) -> Dict[str, float]:
    """FID, sFID, Inception Score, precision and recall in one Inception pass per set (IS only when `real` is None)."""
    extractor = InceptionFeatureExtractor(inception_weights, antialias=antialias)
    fake_f = extract_features(extractor, fake, batch_size=batch_size, device=device)
    is_mean, is_std = inception_score(fake_f["logits"])
    metrics = {"inception_score": is_mean, "inception_score_std": is_std, "num_fake": len(fake)}
    if real is not None:
        real_f = extract_features(extractor, real, batch_size=batch_size, device=device)
        metrics["fid"] = frechet_distance(real_f["pool"], fake_f["pool"])
        metrics["sfid"] = frechet_distance(real_f["spatial"], fake_f["spatial"])
        metrics.update(precision_recall(real_f["pool"], fake_f["pool"], k=k))
        metrics["num_real"] = len(real)
    metrics["antialias"] = antialias
    return metrics
