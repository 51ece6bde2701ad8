"""Scale-out: a bundle's sample range (or a data set's log-likelihoods) cut into shards, computed on a Ray cluster,
stored as files with an index.

``sample_on_ray`` and ``likelihood_on_ray`` need Ray (``pip install 'vpsde[ray]'``); the on-disk format and its
reader do not.
"""

from vpsde.scale.shards import RunMismatch, ShardedSamples, load_samples


def _ray_driver(name: str):
    try:
        from vpsde.scale import ray_sampling
    except ImportError as e:
        from vpsde.runtime.errors import BackendUnavailable

        raise BackendUnavailable(f"running on Ray needs Ray ({e}): pip install 'vpsde[ray]'") from None
    return getattr(ray_sampling, name)


def sample_on_ray(*args, **kwargs):
    """See :func:`vpsde.scale.ray_sampling.sample_on_ray` (imported on use: Ray is an optional dependency)."""
    return _ray_driver("sample_on_ray")(*args, **kwargs)


def likelihood_on_ray(*args, **kwargs):
    """See :func:`vpsde.scale.ray_sampling.likelihood_on_ray` (imported on use: Ray is an optional dependency)."""
    return _ray_driver("likelihood_on_ray")(*args, **kwargs)


__all__ = ["RunMismatch", "ShardedSamples", "likelihood_on_ray", "load_samples", "sample_on_ray"]
