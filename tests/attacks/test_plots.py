"""Plots write readable PNGs of the expected size and reject bad input."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from dptrain.attacks import plot_exposure_histogram, plot_roc  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path)


def test_roc_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    curves = {
        "strong": (rng.normal(2, 1, 2000), rng.normal(0, 1, 2000)),
        "null": (rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)),
    }
    out = plot_roc(curves, tmp_path / "roc.png")
    image = _read_png(out)
    assert image.shape[:2] == (480, 600)  # 5 x 4 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_exposure_histogram_writes_png(tmp_path):
    exposures = np.r_[np.random.default_rng(1).exponential(1.44, 200), 19.5]
    image = _read_png(plot_exposure_histogram(exposures, tmp_path / "exposure.png", max_bits=19.93))
    assert image.shape[:2] == (480, 600)


def test_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="curves must be a non-empty dict"):
        plot_roc({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="member_scores must be finite"):
        plot_roc({"a": ([np.nan], [0.0])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="exposures must not be empty"):
        plot_exposure_histogram([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
