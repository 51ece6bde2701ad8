"""Quality of generated digits, measured with a classifier trained on the real data.

- A scikit-learn MLP (one hidden layer of 128 ReLU units) trained on the 1500 training digits; its held-out
  accuracy is reported so the yardstick itself is known to work.
- Confidence and class balance of its predictions on generated samples.
- A Fréchet distance between Gaussian fits of the hidden-layer features (the FID recipe, with this small
  classifier in place of Inception) of generated samples and of the real training set. The same distance for
  the held-out real digits is the floor to compare with (at matched sample size: FD is biased upwards at small n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from vpsde.models.digits_data import train_heldout_split


@dataclass
class DigitsYardstick:
    clf: object  # sklearn MLPClassifier
    train_features: np.ndarray
    heldout_accuracy: float

    @classmethod
    def fit(cls, seed: int = 0) -> "DigitsYardstick":
        from sklearn.neural_network import MLPClassifier

        (x_tr, y_tr), (x_ho, y_ho) = train_heldout_split()
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed)
        clf.fit(x_tr.reshape(len(x_tr), -1), y_tr)
        acc = float((clf.predict(x_ho.reshape(len(x_ho), -1)) == y_ho).mean())
        self = cls(clf, np.empty(0), acc)
        self.train_features = self.features(x_tr)
        return self

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer activations [N, 128] of images [N, 1, 16, 16] in [-1, 1]."""
        flat = np.clip(images, -1, 1).reshape(len(images), -1).astype(np.float64)
        return np.maximum(flat @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def frechet(self, images: np.ndarray) -> float:
        return frechet_distance(self.features(images), self.train_features)

    def report(self, images: np.ndarray, bootstrap: int = 20, seed: int = 0) -> dict:
        """FD to the training set (and its bootstrap standard error), confidence, class balance."""
        proba = self.clf.predict_proba(np.clip(images, -1, 1).reshape(len(images), -1))
        counts = np.bincount(proba.argmax(1), minlength=10)
        feats = self.features(images)
        rs = np.random.default_rng(seed)
        boots = [frechet_distance(feats[rs.integers(0, len(feats), len(feats))], self.train_features)
                 for _ in range(bootstrap)]
        return {"n": len(images), "fd_to_train": frechet_distance(feats, self.train_features),
                "fd_bootstrap_se": float(np.std(boots, ddof=1)), "mean_confidence": float(proba.max(1).mean()),
                "class_counts": counts.tolist(), "class_balance_max_dev": float(np.abs(counts / len(images) - 0.1).max()),
                "finite": bool(np.isfinite(images).all())}


def frechet_gaussian(mu_a: np.ndarray, s_a: np.ndarray, mu_b: np.ndarray, s_b: np.ndarray) -> float:
    """Frechet distance of N(mu_a, S_a) and N(mu_b, S_b): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of Gaussian fits to feature sets [N, D]."""
    eye = 1e-6 * np.eye(a.shape[1])  # dead ReLU units make the covariances singular
    return frechet_gaussian(a.mean(0), np.cov(a, rowvar=False) + eye, b.mean(0), np.cov(b, rowvar=False) + eye)
