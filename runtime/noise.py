"""Host-side noise: the portable generator "philox4x32-10/box-muller/v1" and the diffusers-order "torch" one.

Portable spec (DESIGN.md): key (k0, k1) = (seed mod 2^32, seed div 2^32); element e of global sample index s
at noise call c uses Philox4x32-10 counter (e // 4, c, s mod 2^32, s div 2^32) and lane e mod 4 of the
Box-Muller transform of its four output words, computed in float64 and rounded to float32. The result does not
depend on batch size or on how samples are sharded: sample s of call c is the same everywhere.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
PHILOX_ID = "philox4x32-10/box-muller/v1"
TORCH_ID = "torch"
GENERATORS = (PHILOX_ID, TORCH_ID)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32 with 10 rounds (Random123). counter: uint32 [..., 4]; key: two 32-bit ints. -> uint32 [..., 4].

    Words are held in uint64 so the 32x32-bit products are exact; every round updates them in place (no
    temporaries: this runs on the host once per noise call, for every element of the batch)."""
    counter = np.asarray(counter, dtype=np.uint32)
    c0, c1, c2, c3 = (counter[..., i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        np.multiply(PHILOX_M0, c0, out=p0)  # exact 64-bit products of 32-bit words
        np.multiply(PHILOX_M1, c2, out=p1)
        np.right_shift(p1, SHIFT32, out=c0)  # c0' = hi(M1 c2) ^ c1 ^ k0
        c0 ^= c1
        c0 ^= k0
        np.bitwise_and(p1, MASK32, out=c1)  # c1' = lo(M1 c2)
        np.right_shift(p0, SHIFT32, out=c2)  # c2' = hi(M0 c0) ^ c3 ^ k1
        c2 ^= c3
        c2 ^= k1
        np.bitwise_and(p0, MASK32, out=c3)  # c3' = lo(M0 c0)
    out = np.empty(counter.shape, dtype=np.uint32)
    for i, word in enumerate((c0, c1, c2, c3)):
        out[..., i] = word
    return out


def box_muller(words: np.ndarray) -> np.ndarray:
    """Four uint32 words [..., 4] -> four standard normals [..., 4], float64 (pairs (x0, x1) and (x2, x3)):
    u1 = (w0 + 1) / 2^32 in (0, 1] (log never sees 0), u2 = w1 / 2^32, r = sqrt(-2 log u1), theta = 2 pi u2,
    (r cos theta, r sin theta). Computed in place, in exactly that order of float64 operations."""
    w = words.astype(np.float64)
    u1 = w[..., 0::2] + 1.0
    u1 /= 2.0**32
    r = np.log(u1)
    r *= -2.0
    np.sqrt(r, out=r)
    theta = w[..., 1::2] / 2.0**32
    theta *= 2.0 * np.pi
    out = np.empty(words.shape, dtype=np.float64)
    even, odd = out[..., 0::2], out[..., 1::2]
    np.cos(theta, out=even)
    even *= r
    np.sin(theta, out=odd)
    odd *= r
    return out


def philox_normal(seed: int, call: int, first_sample: int, batch: int, sample_shape: tuple[int, ...],
                  num_calls: int | None = None) -> np.ndarray:
    """Standard normals float32 [batch, *sample_shape] for global samples first_sample .. first_sample+batch-1 at
    noise call ``call``; with ``num_calls`` = K, calls call .. call + K - 1 in one pass, [K, batch, *sample_shape]
    (the call index is a counter word, so each slice is bit-identical to its own single-call draw)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    k = 1 if num_calls is None else int(num_calls)
    n_elem = int(np.prod(sample_shape, dtype=np.int64))
    blocks = -(-n_elem // 4)
    s = np.arange(first_sample, first_sample + batch, dtype=np.uint64)
    counter = np.empty((k, batch, blocks, 4), dtype=np.uint32)
    counter[..., 0] = np.arange(blocks, dtype=np.uint32)[None, None, :]
    counter[..., 1] = np.arange(call, call + k, dtype=np.uint64).astype(np.uint32)[:, None, None]
    counter[..., 2] = (s & MASK32).astype(np.uint32)[None, :, None]
    counter[..., 3] = (s >> np.uint64(32)).astype(np.uint32)[None, :, None]
    z = box_muller(philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32)))
    z = z.reshape(k, batch, blocks * 4)[:, :, :n_elem].astype(np.float32).reshape((k, batch, *sample_shape))
    return z[0] if num_calls is None else z


class NoiseSource(Protocol):
    """Draws the noise of one noise call for one batch of samples. ``ordered``: calls must be drawn one at a
    time, in call order (a stateful generator); otherwise any call may be drawn at any time, in parallel."""

    ordered: bool

    def __call__(self, call: int, first_sample: int, batch: int, sample_shape: tuple[int, ...]) -> np.ndarray: ...


class PhiloxNoise:
    """The portable generator; stateless, so any call can be drawn in any order (resume mid-loop)."""

    generator_id = PHILOX_ID
    ordered = False

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __call__(self, call: int, first_sample: int, batch: int, sample_shape: tuple[int, ...]) -> np.ndarray:
        return philox_normal(self.seed, call, first_sample, batch, sample_shape)

    def calls(self, first_call: int, num_calls: int, first_sample: int, batch: int,
              sample_shape: tuple[int, ...]) -> np.ndarray:
        """Calls first_call .. first_call + num_calls - 1 in one pass: float32 [num_calls, batch, *sample_shape]."""
        return philox_normal(self.seed, first_call, first_sample, batch, sample_shape, num_calls)


class TorchNoise:
    """``torch.randn(shape, generator=g)`` in call order, as diffusers' ``randn_tensor`` draws it (CPU
    generator). Depends on batch size, like diffusers. Needs torch installed; imported only when used."""

    generator_id = TORCH_ID
    ordered = True

    def __init__(self, seed: int) -> None:
        try:
            import torch
        except ImportError:
            from vpsde.runtime.errors import BackendUnavailable

            raise BackendUnavailable("the 'torch' noise generator needs torch installed; use the portable "
                                     f"{PHILOX_ID!r} generator instead") from None
        self._torch = torch
        self._gen = torch.Generator().manual_seed(int(seed))
        self._next_call = 0

    def __call__(self, call: int, first_sample: int, batch: int, sample_shape: tuple[int, ...]) -> np.ndarray:
        if call != self._next_call:
            raise ValueError(f"the 'torch' generator draws in call order: expected call {self._next_call}, got {call}")
        self._next_call += 1
        return self._torch.randn((batch, *sample_shape), generator=self._gen).numpy()


def make_noise(generator: str, seed: int) -> NoiseSource:
    if generator == PHILOX_ID:
        return PhiloxNoise(seed)
    if generator == TORCH_ID:
        return TorchNoise(seed)
    raise ValueError(f"unknown noise generator {generator!r}; expected one of {GENERATORS}")
