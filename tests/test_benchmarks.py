"""The benchmark scripts stay runnable: each imports, and clip_floor's routes still agree with each other."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_imports(name):
    importlib.import_module(f"benchmarks.{name}")


def test_clip_floor_routes_give_the_same_clipped_sum():
    from benchmarks import clip_floor

    routes = clip_floor._routes(64, 96)  # asserts one dense chunk and the two routes' agreement
    assert set(routes) == {"non-DP", "instantiate", "ghost"}
