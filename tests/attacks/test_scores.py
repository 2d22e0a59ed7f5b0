"""Numpy membership scores: phi against a high-precision oracle, Min-K%, zlib, LOSS, reference."""

import zlib

import mpmath
import numpy as np
import pytest

from dptrain.attacks import logit_confidence, loss_score, min_k_score, reference_score, zlib_length, zlib_score


def _phi_mp(logits, y):
    with mpmath.workdps(60):
        z = [mpmath.mpf(float(v)) for v in logits]
        p = mpmath.exp(z[y]) / mpmath.fsum(mpmath.exp(v) for v in z)
        return float(mpmath.log(p) - mpmath.log(1 - p))


def test_logit_confidence_matches_high_precision_oracle():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (50, 7))
    logits[0] = [60.0, 0, 0, 0, 0, 0, 0]  # p_y = 1 - 6e-26: log(1 - p_y) by subtraction would be -inf
    logits[1] = [-40.0, 0, 0, 0, 0, 0, 0]  # p_y tiny
    labels = rng.integers(0, 7, 50)
    labels[:2] = 0
    got = logit_confidence(logits, labels)
    expected = [_phi_mp(row, y) for row, y in zip(logits, labels)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert got[0] == pytest.approx(60.0 - np.log(6.0), rel=1e-14)


def test_logit_confidence_binary_is_logit_difference():
    logits = np.array([[0.3, 2.0], [5.0, -1.0]])
    np.testing.assert_allclose(logit_confidence(logits, np.array([1, 0])), [1.7, 6.0])


def test_min_k_takes_floor_of_k_n_lowest_and_at_least_one():
    lp = np.array([[-1.0, -5.0, -2.0, -9.0, -3.0, -0.5, -4.0, -7.0, -6.0, -8.0], [-1.0, -2.0, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = np.zeros_like(lp, bool)
    mask[0] = True
    mask[1, :2] = True
    got = min_k_score(lp, mask, k=0.2)
    assert got[0] == pytest.approx((-9.0 - 8.0) / 2)  # floor(0.2 * 10) = 2 lowest
    assert got[1] == pytest.approx(-2.0)  # floor(0.2 * 2) = 0 -> 1 token
    ragged = min_k_score([lp[0], lp[1, :2]], k=0.5)
    np.testing.assert_allclose(ragged, [np.mean([-9, -8, -7, -6, -5]), -2.0])


def test_min_k_ignores_masked_garbage():
    lp = np.array([[-1.0, -np.inf, np.nan]])
    assert min_k_score(lp, np.array([[True, False, False]]))[0] == -1.0


def test_zlib_and_loss_and_reference_scores():
    texts = ["aaaaaaaaaaaaaaaa", "The quick brown fox jumps"]
    nll = np.array([2.0, 3.0])
    assert zlib_length(texts[1]) == len(zlib.compress(texts[1].encode()))
    np.testing.assert_allclose(zlib_score(nll, texts), -nll / [len(zlib.compress(t.encode())) for t in texts])
    np.testing.assert_array_equal(loss_score(nll), -nll)
    np.testing.assert_array_equal(reference_score(nll, [2.5, 2.0]), [0.5, -1.0])
    assert zlib_length(b"\x00" * 1000) < 30  # bytes are accepted too, and compressed


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: zlib_score([1.0], ["a", "b"]), ValueError, "one text per nll"),
        (lambda: reference_score([1.0, 2.0], [1.0]), ValueError, "shape of losses"),
        (lambda: logit_confidence([[0.0, 1.0]], [2]), ValueError, "labels must be in"),
        (lambda: logit_confidence([[0.0, 1.0]], [0.5]), TypeError, "labels must be integers"),
        (lambda: logit_confidence([[np.nan, 1.0]], [0]), ValueError, "logits must be finite"),
        (lambda: min_k_score([[-1.0]], [[True]], k=0.0), ValueError, "k must be in"),
        (lambda: min_k_score([[-1.0, -2.0]], [[False, False]]), ValueError, "at least one target token"),
        (lambda: loss_score([]), ValueError, "losses must not be empty"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
