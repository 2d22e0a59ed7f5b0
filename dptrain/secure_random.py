"""Random bits from AES-256 in counter mode, turned into exact Bernoulli masks and Gaussian noise: every CPU noise
draw (under a secret key, resumable from its block position) and all of secure mode (a fresh key per draw).

A Mersenne Twister is not secret once its outputs are known: 624 of them give its whole state. The attacker of DP
knows every record but one, hence the clipped sum under either hypothesis, hence the noise of a release under each;
whichever hypothesis yields a noise that continues as one Twister stream is the true one. AES-CTR's keystream
predicts nothing of itself, and a fresh key per draw keeps one draw from telling anything about another.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Optional

import torch

from dptrain import native

__all__ = ["Keystream", "bernoulli_mask", "new_key", "normal_", "normal_bytes", "normals"]

_SQRT_HALF = 0.5**0.5
_MANTISSA = {torch.float32: 24, torch.float64: 53}  # the bits of a uniform (as torch's own samplers use)
_WORDS = {torch.float32: torch.int32, torch.float64: torch.int64}  # the keystream words a uniform is cut from


_ZEROS = b""


def new_key(insecure_label: Optional[str] = None, nbytes: int = 32) -> bytes:
    """A key: ``nbytes`` of OS entropy, or SHAKE-256 of an insecure seed's label (tests and debugging: NOT private)."""
    if insecure_label is None:
        return os.urandom(nbytes)
    return hashlib.shake_256(insecure_label.encode()).digest(nbytes)


class Keystream:
    """Uniform random words from AES-256-CTR under ``key`` (32 bytes; default: fresh from ``os.urandom``), from the
    16-byte block ``block`` of the keystream on. Its buffers are reused from call to call (``workspace``: a dict
    shared by keystreams on one thread, across draws too): fresh pages cost more than the cipher (1.1 against
    5.8 GB/s)."""

    def __init__(self, workspace: dict | None = None, *, key: Optional[bytes] = None, block: int = 0):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if key is not None and len(key) != 32:
            raise ValueError(f"an AES-256 key has 32 bytes, found {len(key)}")
        if not 0 <= block < 1 << 128:
            raise ValueError(f"keystream block {block} is outside [0, 2^128)")
        key = new_key() if key is None else key
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
        self._work = {} if workspace is None else workspace  # reused tensors and byte buffers

    def _encrypt(self, size: int, name: str) -> memoryview:
        """The next ``size`` bytes of the keystream, in the reused byte buffer ``name``."""
        global _ZEROS
        zeros, out = _ZEROS, self._work.get(name)
        if len(zeros) < size:
            zeros = _ZEROS = bytes(size)  # the plaintext (the keystream is its encryption), shared: never written
        if out is None or len(out) < size + 15:  # update_into wants a block's slack
            out = self._work[name] = bytearray(size + 15)
        self._encryptor.update_into(memoryview(zeros)[:size], out)
        return memoryview(out)[:size]

    def _words(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(n,) uniform int32 or int64 words, the next ``n`` of the keystream: a VIEW of a buffer that a later call
        overwrites (the callers below turn it into a new tensor at once)."""
        size = n * dtype.itemsize
        if not n:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._encrypt(size, "words"), dtype=dtype)

    def _buffer(self, name: str, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (name, dtype, str(device))
        if key not in self._work or self._work[key].numel() < n:
            self._work[key] = torch.empty(n, dtype=dtype, device=device)
        return self._work[key][:n]

    def uniforms(self, n: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """(n,) values (k + 1) 2^-b in (0, 1], k uniform below 2^b (b = 24 for fp32, 53 for fp64: all exact), on
        ``device``: a VIEW of a buffer that the next call overwrites."""
        bits, ints = _MANTISSA[dtype], _WORDS[dtype]
        k = torch.bitwise_and(self._words(n, ints), (1 << bits) - 1, out=self._buffer("k", n, ints, "cpu"))
        return self._buffer("uniforms", n, dtype, device).copy_(k).add_(1.0).mul_(2.0**-bits)


def normal_bytes(n: int, dtype: torch.dtype) -> int:
    """Keystream bytes ``normal_`` reads for n values of ``dtype``: 4 uniforms per Box-Muller pair."""
    return 4 * ((n + 1) // 2) * _WORDS[dtype].itemsize


MASK_PIECE = 1 << 20  # samples per keystream read of a mask (8 MiB): its buffers stay that size for any dataset


def bernoulli_mask(stream: Keystream, n: int, rate: float) -> torch.Tensor:
    """(n,) bool, each True with probability exactly ``rate`` (a multiple of 2^-53: ``realizable_rate``): 53-bit
    keystream words, 8 bytes a sample, compared with rate 2^53."""
    threshold = rate * 2.0**53
    if not threshold.is_integer():
        raise ValueError(f"rate {rate!r} is not a multiple of 2^-53; round it with realizable_rate first")
    mask = torch.empty(n, dtype=torch.bool)
    for lo in range(0, n, MASK_PIECE):
        words = stream._words(min(n, lo + MASK_PIECE) - lo, torch.int64)
        torch.lt(words.bitwise_and_((1 << 53) - 1), int(threshold), out=mask[lo: lo + words.numel()])
    return mask


def normals(stream: Keystream, n: int, std: float, block: int) -> torch.Tensor:
    """(n,) fp32 CPU values of N(0, std^2) as ``normal_`` draws them in blocks of ``block``, by the C transform where
    it is built: a VIEW of a buffer that the next call overwrites. Reads ``normal_bytes`` of each block."""
    if block % 2 and block < n:
        raise ValueError(f"blocks of {block} values would split a Box-Muller pair; expected an even block")
    lib = native.library()
    noise = stream._buffer("normals", n + 1, torch.float32, "cpu")  # + 1: an odd block's unused sine half
    if lib is None:
        return normal_(noise[:n], stream, std, block)
    for lo in range(0, n, block):
        pairs = (min(block, n - lo) + 1) // 2
        words = stream._words(4 * pairs, torch.int32)  # (4 * pairs,) as planes: radius, angle of draw 1, then of 2
        lib.keystream_normals(words.data_ptr(), pairs, std * _SQRT_HALF, noise[lo:].data_ptr())
    return noise[:n]


def normal_(out: torch.Tensor, stream: Keystream, std: float, block: Optional[int] = None) -> torch.Tensor:
    """``out`` (n,) <- N(0, std^2) values, each the sum of two Box-Muller draws of std / sqrt(2) from the keystream's
    uniforms (why two: the noise module's docstring), in torch ops on any device and dtype (the reference of the C
    transform). In each block of ``block`` values (default: all n; even, the last one may be shorter), value j and
    j + (m + 1) // 2 of a block of m share their pairs (the cosine and sine halves). Returns ``out``."""
    n = out.numel()
    block = n if block is None or block >= n else block
    if block % 2 and block < n:
        raise ValueError(f"blocks of {block} values would split a Box-Muller pair; expected an even block")
    full = n // block * block
    if full:
        _normal_blocks_(out[:full].view(-1, block), stream, std)
    if full < n:
        _normal_blocks_(out[full:].view(1, -1), stream, std)
    return out


def _normal_blocks_(out: torch.Tensor, stream: Keystream, std: float) -> None:
    """``out`` (G, m) <- G blocks of ``normal_``'s layout, their keystream read block after block."""
    blocks, m = out.shape
    pairs = (m + 1) // 2  # Box-Muller pairs per draw and block
    u = stream.uniforms(blocks * 4 * pairs, out.dtype, out.device).view(blocks, 2, 2, pairs)  # (G, draw, u1 | u2, pair)
    radius = u[:, :, 0].log_().mul_(-2.0).sqrt_()  # (G, 2, pairs)
    theta = u[:, :, 1].mul_(2.0 * math.pi)  # (G, 2, pairs)
    cos = torch.cos(theta, out=stream._buffer("cos", blocks * 2 * pairs, out.dtype, out.device).view(blocks, 2, pairs))
    sin = theta.sin_()
    for part, trig in (out[:, :pairs], cos), (out[:, pairs:], sin):  # r_0 trig_0 + r_1 trig_1 over the part's pairs
        k = part.shape[1]
        torch.mul(radius[:, 0, :k], trig[:, 0, :k], out=part).addcmul_(radius[:, 1, :k], trig[:, 1, :k])
    out.mul_(std * _SQRT_HALF)
