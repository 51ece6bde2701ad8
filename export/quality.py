"""Sample-quality yardsticks for ``vpsde parity --quality``: what a model's samples should look like, scored on
both sides of a comparison (needs torch; the digits yardstick needs scikit-learn).

- the shipped digits model (the bundle's ``model.weights_sha256`` is the shipped weights'): the classifier
  yardstick of ``models/digits_eval.py`` (Fréchet distance to the training set in the classifier's features,
  confidence, class balance);
- an analytic Gaussian mixture (``model.source`` "gmm..."): the exact-truth figures of ``models/gmm_eval.py``.

Other models have no yardstick here (``None``)."""

from __future__ import annotations

import numpy as np

from vpsde.runtime.errors import InputError


def quality_yardstick(bundle):
    """A function samples -> {figure: value} for the bundle's model, or None when there is none. A mixture is
    rebuilt as the eager reference rebuilds it (:func:`~vpsde.export.eager.bundle_model`: a self-contained
    ``model.source`` with the bundle's weights digest)."""
    manifest = bundle.manifest
    source = manifest.model.source or ""
    if source.startswith("gmm"):
        from vpsde.export.eager import bundle_model
        from vpsde.models.gmm_eval import mixture_errors

        try:
            model, _ = bundle_model(bundle)
        except InputError as e:
            raise InputError(f"{bundle.root / 'manifest.json'}: field 'model.source' {source[:120]!r}: --quality has "
                             f"no yardstick for it ({e})") from None
        return lambda x: mixture_errors(model.mixture, x, np.random.default_rng(0))
    import json

    from vpsde.models.shipped import WEIGHTS_DIR

    shipped_sha = json.loads((WEIGHTS_DIR / "digits16.json").read_text())["weights_sha256"]  # no need to load it
    if manifest.model.weights_sha256 and manifest.model.weights_sha256 == shipped_sha:
        try:
            from vpsde.models.digits_eval import DigitsYardstick
        except ImportError:
            raise InputError("--quality on the digits model needs scikit-learn: pip install scikit-learn") from None
        yard = DigitsYardstick.fit()

        def digits(x: np.ndarray) -> dict:
            r = yard.report(x, bootstrap=10)
            return {k: r[k] for k in ("fd_to_train", "fd_bootstrap_se", "mean_confidence", "class_balance_max_dev")}
        return digits
    return None
