"""dptrain.validation: one rule for every argument check (TypeError for a wrong type, ValueError for a wrong
value, one line naming the argument, the expectation and the value)."""

import math

import numpy as np
import pytest

from dptrain.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_nonnegative,
    check_number,
    check_optional_int,
    check_positive,
    check_positive_int,
    check_probability,
    is_integer,
    is_number,
)


@pytest.mark.parametrize("value", [True, "1", None, [1.0], 1 + 0j])
def test_a_non_number_is_a_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match=r"^lr must be a finite number > 0, found "):
        check_positive("lr", value)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_a_bad_number_is_a_value_error_with_the_value(value):
    with pytest.raises(ValueError, match=rf"^lr must be a finite number > 0, found {value!r}$"):
        check_positive("lr", value)


def test_numbers_are_converted_and_numpy_scalars_accepted():
    assert check_positive("x", np.float32(0.5)) == 0.5 and type(check_positive("x", 2)) is float
    assert check_nonnegative("x", 0) == 0.0
    assert check_int("n", np.int64(3), minimum=1) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_positive_int("n", 7) == 7 and check_optional_int("seed", None) is None


def test_interval_ends():
    assert check_fraction("q", 1.0, closed_right=True) == 1.0
    with pytest.raises(ValueError, match=r"q must be a number in \(0, 1\], found 0"):
        check_fraction("q", 0, closed_right=True)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\), found 1"):
        check_fraction("beta", 1, closed_right=False)
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 1\)"):
        check_probability("delta", 1.0)
    assert check_number("g", 5, low=1) == 5.0
    with pytest.raises(ValueError, match="g must be a finite number >= 1, found 0.5"):
        check_number("g", 0.5, low=1)


def test_integers_refuse_bools_and_floats_and_name_the_range():
    for value in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="steps must be an integer >= 1"):
            check_positive_int("steps", value)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 20\], found 21"):
        check_int("k", 21, minimum=0, maximum=20)
    with pytest.raises(TypeError, match="seed must be an integer or None, found 1.5"):
        check_optional_int("seed", 1.5)


def test_choice():
    assert check_choice("clipping", "flat", ("flat", "per_layer")) == "flat"
    with pytest.raises(ValueError, match=r"clipping must be one of \('flat', 'per_layer'\), found 'Flat'"):
        check_choice("clipping", "Flat", ("flat", "per_layer"))


def test_flags_are_bools_only():
    assert check_bool("rescale", False) is False
    for value in (1, 0, "yes", None):
        with pytest.raises(TypeError, match=rf"^rescale must be a bool, found {value!r} "):
            check_bool("rescale", value)


def test_the_predicates_share_the_rule():
    assert is_number(1) and is_number(np.float32(0.5)) and is_number(np.int8(3)) and is_number(math.nan)
    assert not any(is_number(v) for v in (True, np.bool_(True), "1", None, 1j))
    assert is_integer(np.uint16(4)) and not is_integer(True) and not is_integer(4.0)
