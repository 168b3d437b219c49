"""FeatureNorm: the training-free score of the pretrained space (METHOD.md section 6).

The projector is trained so that normal patch features have a small norm and abnormal
ones a large norm, so the anomaly score of a patch is a = sqrt(||e|| + 1) - 1, averaged
over levels, upsampled to the image and blurred; the image score is the maximum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.evaluate.maps import check_features, image_scores, to_image_maps


def norm_score(feat: Tensor) -> Tensor:
    """(B, C, h, w) features -> (B, h, w) scores sqrt(||e|| + 1) - 1 (float32)."""
    return torch.sqrt(torch.linalg.vector_norm(feat.float(), dim=1) + 1.0) - 1.0


class FeatureNorm:
    """Training-free anomaly maps from feature norms."""

    def fit(self, train_feats: list[Tensor]) -> "FeatureNorm":
        """Nothing to learn; the features are only checked."""
        check_features(train_feats, "train_feats")
        return self

    def predict(self, feats: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        """Maps (B, size, size) and image scores (B,).

        Levels share one grid, so averaging before upsampling equals averaging the
        upsampled maps (bilinear upsampling is linear).
        """
        check_features(feats)
        patch = torch.stack([norm_score(f) for f in feats]).mean(dim=0)
        maps = to_image_maps(patch, size)
        return maps, image_scores(maps)
