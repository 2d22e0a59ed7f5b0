"""Canaries and exposure (Carlini et al. 2019, "The Secret Sharer"), numpy/scipy only.

A template such as ``"My secret code is {d}{d}{d}{d}{d}{d}"`` has slots; each slot draws from an alphabet
(``{d}`` digits, ``{l}`` lowercase letters, ``{x}`` hex digits, ``{u}`` uppercase letters). The candidate space R
is every filling of the slots, |R| = product of the alphabet sizes; a canary is one random filling, inserted into
the training texts a chosen number of times.

Exposure of a canary c with model log-perplexity P (lower = more likely):

    exposure(c) = log2 |R| - log2 rank(c),   rank(c) = 1 + #{r in R : P(r) < P(c)}

so the best-ranked canary among 2^k candidates has exposure k bits, and a canary at a uniformly random rank has
expected exposure ~ 1/ln 2 = 1.44 bits. Three ways to get the rank:

- exact: score the whole space (small spaces);
- interpolation: score a uniform reference sample of candidates, estimate the fraction F of R with lower
  perplexity by linear interpolation of the sample's empirical CDF, and set rank = |R| F (exposure = -log2 F);
- skew-normal extrapolation: beyond the reference sample's lowest value, F comes from a skew-normal fitted to the
  reference perplexities (``scipy.stats.skewnorm``), as in Sec. 4.3 of the paper. Exposure is capped at log2 |R|.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dptrain.validation import check_choice, check_int, check_number

from ._validate import as_scores

__all__ = [
    "SLOT_ALPHABETS",
    "Canary",
    "CanaryTemplate",
    "make_canaries",
    "insert_canaries",
    "exposure_exact",
    "exposure_interpolated",
    "exposure_skewnorm",
    "estimate_exposure",
    "CHANCE_EXPOSURE_BITS",
]

SLOT_ALPHABETS = {
    "d": string.digits,
    "l": string.ascii_lowercase,
    "u": string.ascii_uppercase,
    "x": "0123456789abcdef",
}
CHANCE_EXPOSURE_BITS = 1.0 / math.log(2.0)  # expected exposure of a canary at a uniformly random rank (large |R|)

_SLOT = re.compile(r"\{(\w)\}")


@dataclass(frozen=True)
class Canary:
    """One canary: the full text, the slot values that fill it, and its index in the candidate space."""

    text: str
    secret: str
    index: int


class CanaryTemplate:
    """A text template with random slots; maps candidate indices (mixed radix) to texts and back."""

    def __init__(self, template: str, alphabets: dict[str, str] | None = None):
        if not isinstance(template, str):
            raise TypeError(f"template must be a string, found {type(template).__name__}")
        self.alphabets = dict(SLOT_ALPHABETS if alphabets is None else alphabets)
        self.template = template
        self._parts = _SLOT.split(template)  # literal, slot, literal, slot, ..., literal
        self.slots = self._parts[1::2]
        if not self.slots:
            raise ValueError(f"template must contain at least one slot like {{d}}, found {template!r}")
        unknown = sorted(set(self.slots) - set(self.alphabets))
        if unknown:
            raise ValueError(f"template slots must be one of {sorted(self.alphabets)}, found {unknown}")
        self.radices = [len(self.alphabets[s]) for s in self.slots]
        self.space_size = math.prod(self.radices)

    def __repr__(self) -> str:
        return f"CanaryTemplate({self.template!r}, |R|={self.space_size})"

    def secret(self, index: int) -> str:
        """Slot values of candidate ``index`` (last slot varies fastest)."""
        index = check_int("index", index, minimum=0, maximum=self.space_size - 1)
        chars = []
        for slot, radix in zip(reversed(self.slots), reversed(self.radices)):
            index, digit = divmod(index, radix)
            chars.append(self.alphabets[slot][digit])
        return "".join(reversed(chars))

    def fill(self, secret: str) -> str:
        """The template with its slots filled by the characters of ``secret``."""
        if len(secret) != len(self.slots):
            raise ValueError(f"secret must have {len(self.slots)} characters, found {len(secret)} ({secret!r})")
        out = [self._parts[0]]
        for i, ch in enumerate(secret):
            if ch not in self.alphabets[self.slots[i]]:
                raise ValueError(f"secret character {i} must be in {self.alphabets[self.slots[i]]!r}, found {ch!r}")
            out += [ch, self._parts[2 * i + 2]]
        return "".join(out)

    def candidate(self, index: int) -> str:
        """Text of candidate ``index``."""
        return self.fill(self.secret(index))

    def candidates(self, indices=None) -> list[str]:
        """Texts of the given candidate indices, or of the whole space (only when it has <= 10^6 entries)."""
        if indices is None:
            if self.space_size > 1_000_000:
                raise ValueError(f"the whole space is too large to list ({self.space_size} > 10^6); pass indices")
            indices = range(self.space_size)
        return [self.candidate(int(i)) for i in indices]

    def sample_indices(self, num: int, *, seed: int | None = 0, exclude=()) -> np.ndarray:
        """``num`` distinct uniform candidate indices, none in ``exclude``."""
        num = check_int("num", num, minimum=0)
        excluded = {int(i) for i in exclude}
        if num > self.space_size - len(excluded):
            raise ValueError(f"num must be <= {self.space_size - len(excluded)} free candidates, found {num}")
        rng = np.random.default_rng(seed)
        chosen: dict[int, None] = {}  # insertion-ordered set
        while len(chosen) < num:
            # draw a batch with replacement, keep the new ones in draw order
            missing = num - len(chosen)
            if self.space_size <= 2**62:
                draws = rng.integers(self.space_size, size=missing).tolist()
            else:  # Python ints for spaces beyond int64
                draws = [_uniform_index(rng, self.space_size) for _ in range(missing)]
            for i in draws:
                if i not in excluded and len(chosen) < num:
                    chosen.setdefault(i)
        return np.array(list(chosen), dtype=object if self.space_size > 2**62 else np.int64)


def _uniform_index(rng: np.random.Generator, size: int) -> int:
    """A uniform integer in [0, size) for sizes beyond int64."""
    bits = size.bit_length()
    while True:  # rejection sampling on random bits
        value = int.from_bytes(rng.bytes((bits + 7) // 8), "little") >> ((8 - bits % 8) % 8)
        if value < size:
            return value


def make_canaries(
    template: str | CanaryTemplate = "My secret code is {d}{d}{d}{d}{d}{d}", *, num: int, seed: int | None = 0
) -> list[Canary]:
    """``num`` distinct random canaries from ``template`` with a seeded RNG."""
    tpl = template if isinstance(template, CanaryTemplate) else CanaryTemplate(template)
    indices = tpl.sample_indices(check_int("num", num, minimum=1), seed=seed)
    return [Canary(tpl.candidate(int(i)), tpl.secret(int(i)), int(i)) for i in indices]


def insert_canaries(texts, canaries, repetitions, *, seed: int | None = 0) -> list[str]:
    """A new list: ``texts`` plus each canary repeated ``repetitions`` times (int, or one count per canary),
    at seeded random positions."""
    texts = list(texts)
    canary_texts = [c.text if isinstance(c, Canary) else c for c in canaries]
    if not all(isinstance(t, str) for t in canary_texts):
        raise TypeError("canaries must be Canary objects or strings")
    reps = [repetitions] * len(canary_texts) if np.ndim(repetitions) == 0 else list(repetitions)
    if len(reps) != len(canary_texts):
        raise ValueError(f"repetitions must be one int or one count per canary ({len(canary_texts)}), found {len(reps)}")
    extra = [t for t, r in zip(canary_texts, reps) for _ in range(check_int("repetitions", r, minimum=0))]
    combined = texts + extra
    order = np.random.default_rng(seed).permutation(len(combined))
    return [combined[i] for i in order]


# ---------------------------------------------------------------------------------------------------- exposure
def _space_bits(space_size) -> float:
    return math.log2(check_number("space_size", space_size, low=1.0))


def exposure_exact(canary_scores, candidate_scores) -> np.ndarray:
    """Exposure from the log-perplexities of the WHOLE candidate space (which includes the canaries).

    rank = 1 + #{candidates with strictly lower log-perplexity}; exposure = log2 |R| - log2 rank.
    """
    canary = as_scores(np.atleast_1d(canary_scores), "canary_scores")
    cand = np.sort(as_scores(candidate_scores, "candidate_scores"))
    rank = 1 + np.searchsorted(cand, canary, side="left")  # (n_canaries,)
    return math.log2(cand.size) - np.log2(rank)


def _lower_fraction(canary: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Linearly interpolated empirical CDF: sorted reference value i (0-based) sits at (i + 0.5) / n."""
    ref = np.sort(reference)
    levels = (np.arange(ref.size) + 0.5) / ref.size
    return np.interp(canary, ref, levels, left=0.0, right=1.0)


def exposure_interpolated(canary_scores, reference_scores, *, space_size) -> np.ndarray:
    """Exposure from a uniform reference sample of candidates: -log2 F, F the interpolated fraction of the
    space with lower log-perplexity, floored at rank 1 (exposure <= log2 |R|). Canaries below the sample's
    lowest value get the cap; use :func:`estimate_exposure` to extrapolate them instead."""
    bits = _space_bits(space_size)
    canary = as_scores(np.atleast_1d(canary_scores), "canary_scores")
    frac = _lower_fraction(canary, as_scores(reference_scores, "reference_scores"))
    with np.errstate(divide="ignore"):
        return np.minimum(-np.log2(frac), bits)


def exposure_skewnorm(canary_scores, reference_scores, *, space_size) -> np.ndarray:
    """Exposure from a skew-normal fit to the reference log-perplexities: -log2 CDF(canary), capped at log2 |R|."""
    bits = _space_bits(space_size)
    canary = as_scores(np.atleast_1d(canary_scores), "canary_scores")
    ref = as_scores(reference_scores, "reference_scores")
    if ref.size < 3:
        raise ValueError(f"a skew-normal fit needs at least 3 reference scores, found {ref.size}")
    if np.ptp(ref) == 0:
        raise ValueError(f"a skew-normal fit needs reference scores that vary, found all equal to {ref[0]}")
    a, loc, scale = stats.skewnorm.fit(ref)
    with np.errstate(divide="ignore"):
        log_cdf = stats.skewnorm.logcdf(canary, a, loc, scale)  # natural log
    return np.clip(-log_cdf / math.log(2.0), 0.0, bits)


def estimate_exposure(canary_scores, reference_scores, *, space_size, method: str = "auto") -> np.ndarray:
    """Exposure of canaries from a reference sample: ``"interpolate"``, ``"skewnorm"``, or ``"auto"``
    (interpolation inside the sample's range, skew-normal extrapolation below its lowest value)."""
    check_choice("method", method, ("auto", "interpolate", "skewnorm"))
    if method == "interpolate":
        return exposure_interpolated(canary_scores, reference_scores, space_size=space_size)
    if method == "skewnorm":
        return exposure_skewnorm(canary_scores, reference_scores, space_size=space_size)
    canary = as_scores(np.atleast_1d(canary_scores), "canary_scores")
    ref = as_scores(reference_scores, "reference_scores")
    out = exposure_interpolated(canary, ref, space_size=space_size)
    beyond = canary < ref.min()
    if beyond.any():
        # never report less than the interpolation's value at the sample's edge
        edge = -math.log2(0.5 / ref.size)
        out[beyond] = np.maximum(exposure_skewnorm(canary[beyond], ref, space_size=space_size), min(edge, _space_bits(space_size)))
    return out
