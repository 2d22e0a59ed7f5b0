"""Canary templates, insertion, and exposure (exact, interpolated, skew-normal) against closed forms."""

import math
import re
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from dptrain.attacks import (
    CHANCE_EXPOSURE_BITS,
    CanaryTemplate,
    estimate_exposure,
    exposure_exact,
    exposure_interpolated,
    exposure_skewnorm,
    insert_canaries,
    make_canaries,
)


def test_template_space_and_mixed_radix_indexing():
    tpl = CanaryTemplate("My secret code is {d}{d}{d}{d}{d}{d}")
    assert tpl.space_size == 10**6
    assert tpl.candidate(0) == "My secret code is 000000"
    assert tpl.candidate(123456) == "My secret code is 123456"
    mixed = CanaryTemplate("id {l}-{d}!")
    assert mixed.space_size == 260
    assert [mixed.candidate(i) for i in (0, 9, 10, 259)] == ["id a-0!", "id a-9!", "id b-0!", "id z-9!"]
    assert len(set(mixed.candidates())) == 260


def test_make_canaries_seeded_distinct_and_well_formed():
    canaries = make_canaries(num=50, seed=3)
    assert len({c.text for c in canaries}) == 50
    assert all(re.fullmatch(r"My secret code is \d{6}", c.text) for c in canaries)
    assert all(c.text.endswith(c.secret) for c in canaries)
    assert [c.text for c in canaries] == [c.text for c in make_canaries(num=50, seed=3)]
    assert [c.text for c in canaries] != [c.text for c in make_canaries(num=50, seed=4)]
    small = make_canaries("{d}", num=10, seed=0)  # the whole space, no duplicates
    assert sorted(c.secret for c in small) == list("0123456789")
    huge = make_canaries("{x}" * 20, num=3, seed=0)  # 16^20 > 2^63 candidates
    assert len({c.index for c in huge}) == 3 and all(0 <= c.index < 16**20 for c in huge)


def test_insert_canaries_repetitions_and_content():
    texts = [f"text {i}" for i in range(100)]
    canaries = make_canaries(num=3, seed=0)
    out = insert_canaries(texts, canaries, [1, 4, 16], seed=0)
    counts = Counter(out)
    assert len(out) == 100 + 21
    assert [counts[c.text] for c in canaries] == [1, 4, 16]
    assert all(counts[t] == 1 for t in texts)
    assert out == insert_canaries(texts, canaries, [1, 4, 16], seed=0)
    assert out != texts + [c.text for c, r in zip(canaries, [1, 4, 16]) for _ in range(r)]  # shuffled in
    assert Counter(insert_canaries(texts, canaries, 2))[canaries[0].text] == 2


@pytest.mark.parametrize("k", [1, 4, 10, 16])
def test_best_ranked_canary_among_2_to_the_k_has_k_bits(k):
    rng = np.random.default_rng(k)
    candidates = rng.normal(5.0, 1.0, 2**k)
    best = candidates.min()
    assert exposure_exact(best, candidates)[0] == pytest.approx(k, abs=1e-12)
    # rank r -> k - log2 r
    ranked = np.sort(candidates)
    for r in (1, 2, 2**k):
        assert exposure_exact(ranked[r - 1], candidates)[0] == pytest.approx(k - math.log2(r), abs=1e-12)


def test_chance_exposure_closed_form():
    # a canary at each rank 1..N once: mean exposure = log2 N - log2(N!) / N -> 1/ln 2
    n = 4096
    candidates = np.random.default_rng(0).permutation(n).astype(float)
    mean = exposure_exact(candidates, candidates).mean()
    assert mean == pytest.approx(math.log2(n) - math.lgamma(n + 1) / math.log(2) / n, abs=1e-9)
    assert mean == pytest.approx(CHANCE_EXPOSURE_BITS, abs=0.01)


def test_interpolation_matches_exact_rank_from_a_sample():
    rng = np.random.default_rng(1)
    space = rng.gamma(4.0, 1.0, 200_000)  # log-perplexities of the whole space
    reference = rng.choice(space, 20_000, replace=False)
    fractions = np.array([0.001, 0.01, 0.1, 0.5])
    canaries = np.quantile(space, fractions)
    exact = exposure_exact(canaries, space)
    np.testing.assert_allclose(exact, -np.log2(fractions), atol=0.01)
    approx = exposure_interpolated(canaries, reference, space_size=space.size)
    # sampling error of a fraction p estimated from n references, in bits: sqrt((1 - p) / (n p)) / ln 2
    se_bits = np.sqrt((1 - fractions) / (reference.size * fractions)) / math.log(2)
    assert np.all(np.abs(approx - exact) < 3 * se_bits + 0.02)


def test_skewnorm_extrapolation_on_normal_reference():
    rng = np.random.default_rng(2)
    reference = rng.normal(50.0, 4.0, 5000)
    canaries = np.array([50.0 - 4.0 * z for z in (4.0, 5.0, 6.0)])  # far below every reference value
    truth = -stats.norm.logcdf([-4.0, -5.0, -6.0]) / math.log(2)  # 15.2, 21.8, 29.9 bits
    est = exposure_skewnorm(canaries, reference, space_size=10**12)
    np.testing.assert_allclose(est, truth, rtol=0.15)
    assert np.all(np.diff(est) > 0)  # lower perplexity -> higher exposure
    auto = estimate_exposure(canaries, reference, space_size=10**12)
    np.testing.assert_allclose(auto, est)
    # capped at log2 |R|: rank can't go below 1
    assert exposure_skewnorm([0.0], reference, space_size=2**20)[0] == pytest.approx(20.0)


def test_skewnorm_extrapolation_on_skewed_reference():
    a, loc, scale = 5.0, 10.0, 3.0  # right-skewed: the lower tail is short
    rng = np.random.default_rng(3)
    reference = stats.skewnorm.rvs(a, loc, scale, size=20_000, random_state=rng)
    canary = stats.skewnorm.ppf(1e-7, a, loc, scale)
    assert canary < reference.min()
    est = estimate_exposure([canary], reference, space_size=10**12)[0]
    assert est == pytest.approx(-math.log2(1e-7), abs=2.5)
    # a normal fit would put far more mass down there (much lower exposure): the skew matters
    normal = -stats.norm.logcdf(canary, reference.mean(), reference.std()) / math.log(2)
    assert normal < est - 5


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: CanaryTemplate("no slots here"), ValueError, "at least one slot"),
        (lambda: CanaryTemplate("code {q}"), ValueError, "slots must be one of"),
        (lambda: CanaryTemplate("{d}").fill("12"), ValueError, "secret must have 1 characters"),
        (lambda: CanaryTemplate("{d}").fill("a"), ValueError, "secret character 0"),
        (lambda: make_canaries("{d}", num=11), ValueError, "num must be <= 10"),
        (lambda: insert_canaries(["a"], ["b", "c"], [1]), ValueError, "one count per canary"),
        (lambda: insert_canaries(["a"], ["b"], -1), ValueError, "repetitions must be an integer >= 0"),
        (lambda: exposure_exact([1.0], []), ValueError, "candidate_scores must not be empty"),
        (lambda: exposure_interpolated([np.nan], [1.0], space_size=10), ValueError, "canary_scores must be finite"),
        (lambda: exposure_interpolated([1.0], [1.0], space_size=0), ValueError, "space_size must be"),
        (lambda: exposure_skewnorm([1.0], [1.0, 1.0, 1.0], space_size=10), ValueError, "vary"),
        (lambda: estimate_exposure([1.0], [1.0, 2.0, 3.0], space_size=10, method="x"), ValueError, "method must be"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
