"""Score networks: noise-predicting models in continuous VP time, ``eps = model(x, t)``."""

from vpsde.models.base import ScoreModel, TimeLabelAdapter
from vpsde.models.gmm import GaussianMixture, GaussianMixtureScore
from vpsde.models.unet import SmallUNet, UNetConfig

__all__ = [
    "ScoreModel",
    "TimeLabelAdapter",
    "GaussianMixture",
    "GaussianMixtureScore",
    "SmallUNet",
    "UNetConfig",
]
