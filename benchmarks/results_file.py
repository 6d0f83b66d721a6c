"""The benchmarks' one way to write their results file."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(out: Path, result: dict) -> None:
    """`result` as indented JSON at `out` (its folder made if missing), and a line saying where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
