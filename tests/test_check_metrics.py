"""scripts/check_metrics.py: leaves within the tolerance pass, one outside (or missing) is reported."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from check_metrics import differences, leaves  # noqa: E402


def test_leaves_flatten_numbers_like_dvc():
    assert leaves({"a": {"b": 1, "c": [1, 2], "d": "x"}, "e": 0.5, "f": True}) == {"a.b": 1.0, "e": 0.5}


def test_tolerance_and_missing_leaves():
    reference = {"top1": 0.595727, "cache": {"speedup": 0.71}, "gone": 1.0}
    assert differences({"top1": 0.595586, "cache": {"speedup": 0.7101}, "gone": 1.0}, reference, 0.002, 0.01) == []
    lines = differences({"top1": 0.58, "cache": {"speedup": 0.8}, "new": 2.0}, reference, 0.002, 0.01)
    assert [line.split(":")[0] for line in lines] == ["gone", "new", "cache.speedup", "top1"]
