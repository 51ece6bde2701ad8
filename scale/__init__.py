"""Scale-out: a bundle's sample range cut into shards, computed on a Ray cluster, stored as files with an index.

``sample_on_ray`` needs Ray (``pip install 'vpsde[ray]'``); the on-disk format and its reader do not.
"""

from vpsde.scale.shards import RunMismatch, ShardedSamples, load_samples


def sample_on_ray(*args, **kwargs):
    """See :func:`vpsde.scale.ray_sampling.sample_on_ray` (imported on use: Ray is an optional dependency)."""
    try:
        from vpsde.scale.ray_sampling import sample_on_ray as run
    except ImportError as e:
        from vpsde.runtime.errors import BackendUnavailable

        raise BackendUnavailable(f"sampling on Ray needs Ray ({e}): pip install 'vpsde[ray]'") from None
    return run(*args, **kwargs)


__all__ = ["RunMismatch", "ShardedSamples", "load_samples", "sample_on_ray"]
