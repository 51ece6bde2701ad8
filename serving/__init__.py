"""Serving bundles on Triton Inference Server: a model repository any Triton runs (Python backend driving
``vpsde.runtime``), a local server for it, and a client.

Request contract (docs/DESIGN.md, "Serving"): inputs ``seed`` UINT64 [1], ``first_sample`` UINT64 [1], ``num``
INT32 [1] (+ the bundle's conditioning inputs), output ``samples`` FP32 [num, *sample_shape] (with Triton's
leading batch dimension of 1). A response equals ``Sampler.sample(num, seed, first_sample=...)`` bit for bit,
whatever the server batched the request with.
"""
