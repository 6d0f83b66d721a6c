"""The headline figures of the last run, read from the stages' DVC metrics files (what `make run` prints).
A family whose metrics are missing is left out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tasks.layout import METRICS_DIR, PLOTS_DIR
from tasks.report.report import profile_line


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def headline(root: Path) -> str:
    metrics = root / METRICS_DIR
    profile = profile_line(root)
    lines: list[str] = list(profile)
    compare = root / PLOTS_DIR / "lm_compare.csv"  # the comparison in its table order
    if compare.is_file():
        sentence, stream = "test perplexity (context from each sentence's <s>, as the n-gram)", "stream context"
        lines.append("Language models, test perplexity (lower is better):")
        lines.append(f"  {'model':<12} {sentence}  {stream}")
        with open(compare, newline="") as rows:
            for row in csv.DictReader(rows):
                other = row.get("test_perplexity_stream") or ""
                other = f"{float(other):{len(stream)}.2f}" if other else ""
                lines.append(
                    f"  {row['model']:<12} {float(row['test_perplexity']):{len(sentence)}.2f}  {other}".rstrip()
                )
    detection, onnx = _read(metrics / "map.json"), _read(metrics / "onnx.json") or {}
    if detection:
        lines.append("Detectors, test split:")
        lines.append(f"  {'detector':<12} {'AP':>6} {'AP50':>6} {'AP75':>6} {'AR100':>6}  {'onnx p50 ms':>11}")
        for name, m in detection.items():
            p50 = onnx.get(name, {}).get("latency_onnx_fp32", {}).get("p50_ms", float("nan"))
            lines.append(
                f"  {name:<12} {m['AP']:6.3f} {m['AP50']:6.3f} {m['AP75']:6.3f} {m['AR100']:6.3f}  {p50:11.2f}"
            )
    from tasks.report.report import generator_rows

    generators = generator_rows(root)
    if generators:
        floor, ceiling = generators[0][1]["fid_floor"], generators[0][1]["fid_ceiling"]
        lines.append(f"Image generators, FID vs test (floor {floor:.3f}, noise ceiling {ceiling:.1f}):")
        lines += [f"  {name:<18} {m['fid']:8.3f}" for name, m in generators]
    return "\n".join(lines) if len(lines) > len(profile) else "no metrics yet: run `kiln run`"
