"""The digits quality yardstick is itself checked: the classifier works, the Fréchet formula matches its
closed form, and the feature distance separates real digits from noise."""

import numpy as np

from vpsde.models.digits_data import train_heldout_split
from vpsde.models.digits_eval import DigitsYardstick, frechet_distance


def test_frechet_distance_closed_form():
    """N(0, I) vs N(mu, 4 I) in d dims: FD = |mu|^2 + d (1 + 4 - 2 * 2). 200k draws: sampling error of the
    estimate ~ d * sqrt(2/n) * O(1) << 0.1."""
    rs = np.random.default_rng(0)
    d, n = 4, 200_000
    mu = np.array([1.0, -2.0, 0.5, 0.0])
    a = rs.standard_normal((n, d))
    b = mu + 2.0 * rs.standard_normal((n, d))
    assert abs(frechet_distance(a, b) - (mu @ mu + d)) < 0.1
    assert frechet_distance(a, a) < 1e-4


def test_yardstick_separates_real_from_noise():
    yard = DigitsYardstick.fit()
    assert yard.heldout_accuracy > 0.9
    _, (x_ho, _) = train_heldout_split()
    real = yard.report(x_ho, bootstrap=2)
    noise = yard.frechet(np.random.default_rng(0).uniform(-1, 1, x_ho.shape).astype(np.float32))
    assert real["fd_to_train"] * 10 < noise
    assert real["mean_confidence"] > 0.9 and real["class_balance_max_dev"] < 0.05
