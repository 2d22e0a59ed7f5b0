"""Public API: every exported name resolves, and the numpy-only part loads without torch or matplotlib."""

import subprocess
import sys

import numpy as np

import dptrain.attacks as attacks


def test_all_exports_resolve():
    for name in attacks.__all__:
        assert getattr(attacks, name) is not None, name


def test_import_is_light():
    code = (
        "import sys, dptrain.attacks as a; a.roc_metrics([1.0], [0.0]);"
        "assert 'torch' not in sys.modules, 'torch'; assert 'matplotlib' not in sys.modules, 'matplotlib'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sample_inclusion_mask_is_fair_and_seeded():
    mask = attacks.sample_inclusion_mask(20_000, seed=5)
    assert mask.dtype == bool and abs(mask.mean() - 0.5) < 0.015
    np.testing.assert_array_equal(mask, attacks.sample_inclusion_mask(20_000, seed=5))
