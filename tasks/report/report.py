"""The `report` stage: every family's metrics in one Markdown report with PNG plots (data/report/), and the
same as one self-contained HTML page, logged to MLflow and published as a Prefect markdown artifact. It
reads only the stages' DVC metrics and plots files, so it can be rebuilt from any checkout whose outputs
DVC has.

Sections: language-model perplexity; image generators' FID with the floor and noise ceiling, the
guidance trade-off and the SD3 ablations; detection mAP and latency. A family whose metrics are missing
is left out of the report and named at its end.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.io import atomic_path
from tasks.layout import METRICS_DIR, PLOTS_DIR, REPORT_DIR
from tasks.spec import NoInputs, StageContext, StageSpec


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _figure(width: float = 5.5, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=120)


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib figure
    missing: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)  # the table `make run` prints
    header: list[str] = field(default_factory=list)  # profile, commit and date, above the sections

    def markdown(self) -> str:
        header = "".join(f"{line}  \n" for line in self.header)
        text = "# Kiln report\n\n" + (header + "\n" if header else "") + "\n\n".join(self.sections)
        if self.missing:
            text += "\n\n_Not in this report (no metrics yet): " + ", ".join(self.missing) + "._"
        return text + "\n"


# The LM table's columns (markdown: `<s>` in code, or it would open a strikethrough).
LM_SENTENCE_COLUMN = "test perplexity (context from each sentence's `<s>`, as the n-gram)"
LM_STREAM_COLUMN = "stream context"


def language_models(root: Path, report: Report) -> None:
    compare = root / PLOTS_DIR / "lm_compare.csv"
    if not compare.is_file():
        report.missing.append("language models")
        return
    with open(compare, newline="") as f:
        rows = [
            (r["model"], float(r["test_perplexity"]), r.get("test_perplexity_stream") or "") for r in csv.DictReader(f)
        ]
    table = [
        f"| model | {LM_SENTENCE_COLUMN} | {LM_STREAM_COLUMN} |",
        "|---|---:|---:|",
        *(f"| {m} | {p:.2f} | {f'{float(q):.2f}' if q else ''} |" for m, p, q in rows),
    ]
    report.sections.append(
        "## Language models\n\nPerplexity on the shared test sentences (lower is better). The first column is "
        "like for like: every model scores each sentence with the context from its `<s>` only, as the "
        "Kneser-Ney model does. The stream-context column (neural LMs only) scores the continuous test stream "
        "with sliding windows whose context crosses sentence boundaries.\n\n"
        + "\n".join(table)
        + "\n\n![](lm_perplexity.png)"
    )
    fig, ax = _figure()
    ax.barh([m for m, _, _ in rows][::-1], [p for _, p, _ in rows][::-1])
    ax.set(xscale="log", xlabel="test perplexity (context from each sentence's <s>)", title="Language models")
    fig.tight_layout()
    report.figures["lm_perplexity.png"] = fig
    best = min(rows, key=lambda r: r[1])  # like for like: context from each sentence's <s>
    report.headline.append(f"language models: best test perplexity {best[1]:.2f} ({best[0]})")


def generator_rows(root: Path) -> list[tuple[str, dict]]:
    """(name, metrics) of every image generator with a metrics file that carries an FID."""
    metrics = root / METRICS_DIR
    rows = []
    for folder, prefix in (("diffusion", "diffusion@"), ("nflow", "nflow@")):
        for path in sorted((metrics / folder).glob("*.json")):
            data = _read(path)
            if isinstance(data, dict) and "fid" in data:
                rows.append((prefix + path.stem, data))
    for name in ("ldm_text", "controlnet"):
        data = _read(metrics / f"{name}.json")
        if isinstance(data, dict) and "fid" in data:
            rows.append((name, data))
    return rows


def image_generation(root: Path, report: Report) -> None:
    rows = generator_rows(root)
    if not rows:
        report.missing.append("image generation")
        return
    floor, ceiling = rows[0][1]["fid_floor"], rows[0][1]["fid_ceiling"]
    table = ["| generator | FID | class accuracy | bits/dim | note |", "|---|---:|---:|---:|---|"]
    for name, m in rows:
        note = f"{m.get('headline_sampler', '')} {int(m['headline_steps'])} steps" if "headline_steps" in m else ""
        acc = f"{m['class_accuracy']:.3f}" if "class_accuracy" in m else ""
        bpd = f"{m['test_bpd']:.3f}" if "test_bpd" in m else ""
        table.append(f"| {name} | {m['fid']:.3f} | {acc} | {bpd} | {note} |")
    text = (
        f"## Image generation\n\nFID against the test split: floor (train split vs test split) {floor:.3f}, "
        f"noise ceiling (uniform noise vs test split) {ceiling:.1f}. ControlNet's samples are conditioned on the "
        "test images' edge maps, so its FID is not comparable with the others'.\n\n"
        + "\n".join(table)
        + "\n\n![](fid.png)"
    )
    fig, ax = _figure()
    ax.barh([n for n, _ in rows][::-1], [m["fid"] for _, m in rows][::-1])
    ax.axvline(floor, color="gray", linestyle="--", label=f"floor {floor:.2f}")
    ax.axvline(ceiling, color="red", linestyle=":", label=f"noise ceiling {ceiling:.0f}")
    ax.set(xscale="log", xlabel="FID vs test (log)", title="Image generators")
    ax.legend(fontsize=7)
    fig.tight_layout()
    report.figures["fid.png"] = fig
    # ControlNet samples copy the test images' own edge maps, so its FID is not comparable with the others'.
    best = min((r for r in rows if r[0] != "controlnet"), key=lambda r: r[1]["fid"])
    report.headline.append(
        f"image generators: best FID {best[1]['fid']:.3f} ({best[0]}); floor {floor:.3f}, noise ceiling {ceiling:.1f}"
    )

    guidance = root / PLOTS_DIR / "guidance.csv"
    if guidance.is_file():
        with open(guidance, newline="") as f:
            sweep = list(csv.DictReader(f))
        if sweep and "val_fid" not in sweep[0]:
            raise ValueError(
                f"{guidance}: no val_fid column (written before scales were chosen on val); rerun guidance"
            )
        chosen = _read(root / METRICS_DIR / "guidance.json") or {}
        lines = [
            "| guidance | scale | val FID | val class accuracy | selected |",
            "|---|---:|---:|---:|:---:|",
        ]
        lines += [
            f"| {r['guidance']} | {float(r['scale']):g} | {float(r['val_fid']):.3f} | "
            f"{float(r['val_class_accuracy']):.3f} | {'yes' if r.get('selected') == 'True' else ''} |"
            for r in sweep
        ]
        kinds = list(dict.fromkeys(r["guidance"] for r in sweep))
        tested = [k for k in kinds if f"{k}_selected_test_fid" in chosen]
        if tested:
            lines += [
                "",
                "| guidance | selected scale (on val) | test FID | test class accuracy |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| {k} | {chosen[f'{k}_selected_scale']:g} | {chosen[f'{k}_selected_test_fid']:.3f} | "
                f"{chosen[f'{k}_selected_test_class_accuracy']:.3f} |"
                for k in tested
            ]
        val_images = chosen.get("val_fid_reference_images")
        note = f" ({val_images:.0f} val images)" if val_images else ""
        text += (
            "\n\n### Guidance scale (DDPM)\n\nThe sweep is scored against the val split"
            + note
            + "; each kind's scale is selected by val FID and only that scale is scored on test.\n\n"
            + "\n".join(lines)
            + "\n\n![](guidance.png)"
        )
        fig, ax = _figure()
        for kind in kinds:
            part = [r for r in sweep if r["guidance"] == kind]
            ax.plot(
                [float(r["val_class_accuracy"]) for r in part],
                [float(r["val_fid"]) for r in part],
                marker="o",
                label=kind,
            )
        ax.set(yscale="log", xlabel="class accuracy of samples", ylabel="FID vs val", title="Guidance trade-off (val)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        report.figures["guidance.png"] = fig
    dit = _read(root / METRICS_DIR / "diffusion" / "dit_rf.json")
    if dit:
        by_sampler: dict[str, dict[int, float]] = {}
        for r in dit["sweep"]:
            by_sampler.setdefault(r["sampler"], {})[int(r["steps"])] = r["fid"]
        steps = sorted({s for fids in by_sampler.values() for s in fids})
        lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
        lines += [
            f"| {name} | " + " | ".join(f"{fids[s]:.3f}" if s in fids else "" for s in steps) + " |"
            for name, fids in by_sampler.items()
        ]
        text += "\n\n### DiT-RF against the UNet DDPM at equal steps (FID)\n\n" + "\n".join(lines)
    ablation = _read(root / METRICS_DIR / "dit_ablation.json")
    if ablation:
        lines = ["| variant | FID | class accuracy | latent channels |", "|---|---:|---:|---:|"]
        lines += [
            f"| {r['variant']} | {r['fid']:.3f} | {r['class_accuracy']:.3f} | {r['latent_channels']} |"
            for r in ablation["variants"]
        ]
        text += "\n\n### DiT-RF: SD3 design choices, one at a time\n\n" + "\n".join(lines)
    report.sections.append(text)


def detection(root: Path, report: Report) -> None:
    summaries = _read(root / METRICS_DIR / "map.json")
    if not summaries:
        report.missing.append("detection")
        return
    onnx = _read(root / METRICS_DIR / "onnx.json") or {}
    table = [
        "| detector | AP | AP50 | AP75 | AR100 | eager p50 ms | onnxruntime p50 ms | int8 p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summaries.items():
        o = onnx.get(name, {})
        lat = [o.get(k, {}).get("p50_ms") for k in ("latency_torch", "latency_onnx_fp32", "latency_onnx_int8")]
        cells = " | ".join(f"{v:.2f}" if v is not None else "" for v in lat)
        table.append(f"| {name} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f} | {m['AR100']:.3f} | {cells} |")
    report.sections.append(
        "## Detection\n\nCOCO metrics on the test scenes; batch-1 latency.\n\n"
        + "\n".join(table)
        + "\n\n![](detection.png)"
    )
    fig, ax = _figure()
    names = list(summaries)
    ax.bar(names, [summaries[n]["AP50"] for n in names], label="AP50")
    ax.bar(names, [summaries[n]["AP"] for n in names], label="AP@[.5:.95]")
    ax.set(ylim=(0, 1), ylabel="test", title="Detectors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    report.figures["detection.png"] = fig
    best = max(summaries, key=lambda n: summaries[n]["AP50"])
    report.headline.append(f"detectors: best AP50 {summaries[best]['AP50']:.3f} ({best})")


SECTIONS: list[Callable[[Path, Report], None]] = [language_models, image_generation, detection]


def profile_line(root: Path) -> list[str]:
    """Which profile the params are on: smoke figures come from toy sizes and say so."""
    from tasks.runtime import load_runtime

    if not (root / "params" / "runtime.yaml").is_file():
        return []
    profile = load_runtime(root / "params").profile
    if profile == "smoke":
        return ["Profile: smoke (seconds-sized models and data: these figures test the plumbing, not the methods)"]
    return [f"Profile: {profile}"]


def provenance(root: Path) -> list[str]:
    """Where the figures come from: the params' profile (smoke figures say they only test the plumbing),
    the commit they were computed at, and when."""
    from datetime import UTC, datetime

    from tasks.tracking import git_commit

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [*profile_line(root), f"Commit: {git_commit(root)}", f"Generated: {when}"]


def build_report(root: Path) -> Report:
    report = Report(header=provenance(root))
    for section in SECTIONS:
        section(root, report)
    return report


def report_html(markdown_text: str, images: dict[str, bytes]) -> str:
    """The report as one self-contained page, its plots inline as data URIs: MLflow's artifact view
    renders HTML, while it shows Markdown as text and cannot follow a relative image link."""
    import base64

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    for name, data in images.items():
        body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{base64.b64encode(data).decode()}"')
    style = (
        "body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>Kiln report</title><style>{style}</style></head>'
        f"<body>\n{body}\n</body></html>\n"
    )


@task(name="report", cache_policy=NO_CACHE)
def report_task(ctx: StageContext, inputs: NoInputs) -> dict[str, float]:
    root, run = ctx.root, ctx.run
    from prefect.artifacts import create_markdown_artifact

    report = build_report(root)
    markdown = report.markdown()
    with atomic_path(root / REPORT_DIR, directory=True) as tmp:
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        for name, fig in report.figures.items():
            fig.savefig(tmp / name)
        images = {name: (tmp / name).read_bytes() for name in report.figures}
        (tmp / "report.html").write_text(report_html(markdown, images), encoding="utf-8")
    run.log_artifact(root / REPORT_DIR / "report.md", "report")
    run.log_artifact(root / REPORT_DIR / "report.html", "report")
    for name in report.figures:
        run.log_artifact(root / REPORT_DIR / name, "report")
    create_markdown_artifact(markdown, key="kiln-report", description="Kiln: every family's metrics")
    print("\n".join(report.headline))
    return {"sections": float(len(report.sections)), "missing_sections": float(len(report.missing))}


SPEC = StageSpec(name="report", family="report", task=report_task, seeded=False, runtime_keys=("profile",))
