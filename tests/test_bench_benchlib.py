"""bench/benchlib.py: the results writer keeps every value and puts plain lists on one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import benchlib  # noqa: E402

REPORT = {
    "benchmark": "λ-curve",
    "machine": {"load_average_start": [4.71, 3.8, 2.5], "cuda_available": False, "gpu": None},
    "empty": {"dict": {}, "list": []},
    "results": [
        {"seed": 0, "returns": [1.5, -2.0, 3e-07], "labels": ["a, b", 'say "hi"', "[x]"]},
        {"seed": 1, "nested": [[1, 2], [3]], "mixed": [1, {"k": [True, False]}]},
    ],
}


def test_every_value_survives_and_plain_lists_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    benchlib.write_json(path, REPORT)
    text = path.read_text()
    assert json.loads(text) == REPORT and text.endswith("}\n")
    assert '"returns": [1.5, -2.0, 3e-07]' in text and '"labels": ["a, b", "say \\"hi\\"", "[x]"]' in text
    assert '"benchmark": "λ-curve"' in text  # written as UTF-8, not escaped


def test_without_plain_lists_it_is_json_dumps_indent_2() -> None:
    report = {"a": {"b": 1, "c": {"d": "e"}}, "f": [{"g": None}], "h": {}}
    assert benchlib.dumps_report(report) == json.dumps(report, indent=2)
