"""The `report` stage: every family's metrics in one Markdown report with PNG plots (data/report/), and the
same as one self-contained HTML page, logged to MLflow and published as a Prefect markdown artifact. It
reads only the stages' DVC metrics and plots files, so it can be rebuilt from any checkout whose outputs
DVC has.

Sections: language-model perplexity; image generators' FID with the floor and noise ceiling, the
guidance trade-off and the SD3 ablations; detection mAP and latency. A family whose metrics are missing
is left out of the report and named at its end.

Comparisons carry their 95 % intervals where the stages computed them: `value [low, high]`. Two models are
ranked only when the paired interval of their difference excludes 0 and, where they were trained with several
seeds (`params/replicates.yaml`), their intervals over seeds do not overlap; otherwise the pair is marked
"n.s." (not significant) and the report says the data cannot tell them apart. Where a table has no such test
(the image generators), the report says so beside it instead of implying a ranking.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.seeds import SeedSummary, seed_summary, separated
from tasks.io import atomic_path
from tasks.layout import METRICS_DIR, PLOTS_DIR, REPORT_DIR
from tasks.spec import ReplicatesConfig, StageContext, StageSpec, replicate_item, replicate_name


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
    # The replicate numbers whose metrics the generator table pools (params/replicates.yaml); None: none.
    replicates: ReplicatesConfig | None = None

    def markdown(self) -> str:
        header = "".join(f"{line}  \n" for line in self.header)
        text = "# Kiln report\n\n" + (header + "\n" if header else "") + "\n\n".join(self.sections)
        if self.missing:
            text += "\n\n_Not in this report (no metrics yet): " + ", ".join(self.missing) + "._"
        return text + "\n"


# The LM table's columns (markdown: `<s>` in code, or it would open a strikethrough).
LM_SENTENCE_COLUMN = "test perplexity (context from each sentence's `<s>`, as the n-gram)"
LM_STREAM_COLUMN = "stream context"
NOT_SIGNIFICANT = "n.s."
LM_SEEDS_COLUMN = "over seeds, mean [95 %]"


def one_seed_caveat(key: str) -> str:
    """What a verdict means where the profile trained one model per row (`replicates.<key>` empty)."""
    return (
        f"One trained model each: `params/replicates.yaml: replicates.{key}` lists no seed replicates in this "
        "profile, so a difference marked significant holds for these weights and this test set; retraining with "
        f"another seed may close or reverse it. `replicates.{key}: [1, 2]` adds two seeds and their intervals."
    )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def with_interval(value: float, low: str | float | None, high: str | float | None, fmt: str = ".2f") -> str:
    """`value [low, high]`, or the value alone where the stage computed no interval."""
    if low in (None, "") or high in (None, ""):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{float(low):{fmt}}, {float(high):{fmt}}]"


def _significant(row: dict[str, str]) -> bool:
    """A pair's difference stands: its paired bootstrap interval excludes 0, and its two seed intervals do not
    overlap where the stage had replicates (`seed_separated` empty: no seed replicates to consult)."""
    seeds = str(row.get("seed_separated") or "").strip().lower()
    return str(row["significant"]).strip().lower() == "true" and seeds != "false"


def verdict_cell(row: dict[str, str], winner: str, how: str) -> str:
    """`<winner> <how>`, or n.s. with the reason: the test set cannot tell them apart, or the seeds cannot."""
    if _significant(row):
        return f"{winner} {how}"
    if str(row["significant"]).strip().lower() == "true":
        return f"{NOT_SIGNIFICANT} (seed intervals overlap)"
    return f"{NOT_SIGNIFICANT} (not significant)"


def seeds_cell(mean: str | float | None, low: str | float | None, high: str | float | None, n: Any, fmt: str) -> str:
    """`mean [low, high] (n seeds)` over training seeds, or `1 seed` where there were no replicates."""
    if n in (None, "") or int(float(n)) < 2 or low in (None, ""):
        return "1 seed"
    return f"{with_interval(float(mean), low, high, fmt)} ({int(float(n))} seeds)"  # type: ignore[arg-type]


def ranking_line(ranked: list[str], pairs: list[dict[str, str]]) -> str:
    """The models from lowest to highest point estimate, `<` between neighbours whose paired difference is
    significant and `~` (n.s.) where it is not, or where the pair was not tested."""
    tested = {(p["better"], p["worse"]): _significant(p) for p in pairs}
    out = ranked[:1]
    for a, b in zip(ranked, ranked[1:]):
        out += ["<" if tested.get((a, b)) else "~", b]
    return " ".join(out)


def language_models(root: Path, report: Report) -> None:
    compare = root / PLOTS_DIR / "lm_compare.csv"
    if not compare.is_file():
        report.missing.append("language models")
        return
    rows = _csv_rows(compare)
    # lm_compare writes the seed columns always; one seed (no replicates in the profile) is no interval
    seeded = any(int(float(r.get("seeds") or 1)) > 1 for r in rows)
    table = [
        f"| model | {LM_SENTENCE_COLUMN} | {LM_STREAM_COLUMN} |" + (f" {LM_SEEDS_COLUMN} |" if seeded else ""),
        "|---|---:|---:|" + ("---:|" if seeded else ""),
    ]
    for r in rows:
        cell = with_interval(
            float(r["test_perplexity"]), r.get("test_perplexity_ci_low"), r.get("test_perplexity_ci_high")
        )
        stream = r.get("test_perplexity_stream") or ""
        line = f"| {r['model']} | {cell} | {f'{float(stream):.2f}' if stream else ''} |"
        if seeded:
            over = (
                "deterministic"
                if r["family"] == "ngram"
                else seeds_cell(
                    r["test_perplexity_seed_mean"],
                    r["test_perplexity_seed_ci_low"],
                    r["test_perplexity_seed_ci_high"],
                    r["seeds"],
                    ".2f",
                )
            )
            line += f" {over} |"
        table.append(line)
    text = (
        "## Language models\n\nPerplexity on the shared test sentences (lower is better). The first column is "
        "like for like: every model scores each test sentence with the context from its `<s>` only, as the "
        "Kneser-Ney model does. The stream-context column (neural LMs only) scores the continuous test stream "
        "with sliding windows whose context crosses sentence boundaries.\n\n" + "\n".join(table)
    )
    pairs = _csv_rows(root / PLOTS_DIR / "lm_compare_pairs.csv")
    if "test_perplexity_ci_low" in rows[0]:
        text += (
            "\n\nIn brackets: the 95 % percentile interval over bootstrap resamples of the test sentences "
            "(`params/lm.yaml: lm_compare.resamples`), the same resamples for every model. It covers the choice of "
            "test sentences only, not training-seed variance. The per-model intervals "
            "overlap widely because sentences differ far more from each other than the models do; whether two "
            "models differ is read from the paired interval of their difference below, not from the overlap."
        )
    if seeded:
        text += (
            "\n\nOver seeds: the mean test perplexity of the model trained with seed `runtime.seed` (`lm@*`, the "
            "first column) and again with `runtime.seed + r` for each r in `params/replicates.yaml: replicates.lm` "
            "(`lm_replicate@*`), with the 95 % Student-t interval of that mean. It covers what retraining with "
            "another seed changes; the Kneser-Ney estimate has no seed."
        )
    ppl = {r["model"]: float(r["test_perplexity"]) for r in rows}
    ranked = sorted(ppl, key=ppl.get)
    if pairs:
        lines = [
            "| comparison | difference in log-perplexity, worse minus better [95 % interval] | verdict |",
            "|---|---:|---|",
        ]
        for p in pairs:
            cell = with_interval(float(p["log_perplexity_difference"]), p["ci_low"], p["ci_high"], "+.3f")
            lines.append(f"| {p['worse']} vs {p['better']} | {cell} | {verdict_cell(p, p['better'], 'lower')} |")
        text += (
            "\n\nPaired comparisons: the neighbours of the ranking by point estimate, and the largest Kneser-Ney "
            f"order against each neural LM. A pair whose interval contains 0 is {NOT_SIGNIFICANT}: the test set "
            "cannot tell the two apart, and the report does not rank them. Nor does it where the two models' "
            "intervals over seeds overlap: retraining could change the order.\n\n"
            + "\n".join(lines)
            + f"\n\nRanking (lowest perplexity first; `<` significant, `~` {NOT_SIGNIFICANT}): "
            + ranking_line(ranked, pairs)
        )
        if not seeded:
            text += "\n\n" + one_seed_caveat("lm")
    report.sections.append(text + "\n\n![](lm_perplexity.png)")
    fig, ax = _figure()
    names = [r["model"] for r in rows][::-1]
    values = [ppl[m] for m in names]
    err = None
    if "test_perplexity_ci_low" in rows[0]:
        by_name = {r["model"]: r for r in rows}
        err = [
            [ppl[m] - float(by_name[m]["test_perplexity_ci_low"]) for m in names],
            [float(by_name[m]["test_perplexity_ci_high"]) - ppl[m] for m in names],
        ]
    ax.barh(names, values, xerr=err, capsize=2)
    ax.set(xscale="log", xlabel="test perplexity (context from each sentence's <s>)", title="Language models")
    fig.tight_layout()
    report.figures["lm_perplexity.png"] = fig
    best = ranked[0]  # like for like: context from each sentence's <s>
    line = f"language models: lowest test perplexity {ppl[best]:.2f} ({best})"
    tie = next((p for p in pairs if p["better"] == best and p["worse"] == ranked[1]), None) if len(ranked) > 1 else None
    if tie is not None and not _significant(tie):
        line += f", not significantly below {ranked[1]} ({ppl[ranked[1]]:.2f})"
    report.headline.append(line)


# Said beside every table of generators: what their intervals cover, and how far a ranking goes.
GENERATORS_UNRANKED = (
    "Intervals: the spread of one trained model's FID over independent sample sets (95 % Student-t interval of "
    "the mean); no interval covers training seeds (one trained model each). Generators are ranked by that mean "
    f"only where their intervals do not overlap; overlapping neighbours are marked `~` ({NOT_SIGNIFICANT}). A row "
    "marked single draw has no interval and is not ranked."
)

# ... and where the pixel generators have training-seed replicates (params/replicates.yaml: diffusion).
GENERATOR_SEEDS_COLUMN = "FID over training seeds: mean [95 %]"
GENERATORS_OVER_SEEDS = (
    "Intervals: the spread of one trained model's FID over independent sample sets (95 % Student-t interval of "
    f"the mean), and, in the column `{GENERATOR_SEEDS_COLUMN}`, the headline FID over training seeds: the main stage's "
    "(`diffusion@X`) and each replicate's (`diffusion_replicate@X-r`, seed `runtime.seed + r`), with the 95 % "
    "Student-t interval of that mean. Generators are ranked by the mean over sample sets only where those "
    "intervals do not overlap and, for two generators with replicates, their intervals over seeds do not "
    f"overlap either; other neighbours are marked `~` ({NOT_SIGNIFICANT}). A row marked single draw has no "
    "interval and is not ranked; a row with 1 seed carries no training-seed variance."
)

DRAW_KEYS = ("draws", "mean", "std", "ci_low", "ci_high")  # tasks/generative/fid.py: draw_spread


def draws_cell(m: dict) -> str:
    """`mean [low, high] (n sets)` of a generator's FID over independent sample sets, or `single draw`."""
    low, high = m.get("fid_ci_low"), m.get("fid_ci_high")
    finite = all(isinstance(v, int | float) and math.isfinite(v) for v in (low, high))
    if not finite or "fid_mean" not in m:
        return "single draw"
    return f"{m['fid_mean']:.3f} [{low:.3f}, {high:.3f}] ({int(m.get('fid_draws', 0))} sets)"


def overlap_ranking(rows: list[tuple[str, dict]], seeds: dict[str, SeedSummary] | None = None) -> str:
    """Names by mean FID over sample sets, `<` between neighbours whose intervals are disjoint, `~` where they
    overlap (not significant). Where both neighbours have training-seed replicates (`seeds`), their FID
    intervals over seeds must be disjoint too: a gap one trained model shows may close with another seed.
    Rows without a finite interval are left out."""
    seeds = seeds or {}
    ranked = sorted(
        (r for r in rows if all(math.isfinite(r[1].get(k, math.nan)) for k in ("fid_ci_low", "fid_ci_high"))),
        key=lambda r: r[1]["fid_mean"],
    )
    out = [ranked[0][0]] if ranked else []
    for (first, a), (name, b) in zip(ranked, ranked[1:]):
        apart = a["fid_ci_high"] < b["fid_ci_low"]
        if first in seeds and name in seeds:
            apart = apart and separated(seeds[first], seeds[name]) is not False
        out += ["<" if apart else "~", name]
    return " ".join(out)


def generator_seeds(root: Path, replicates: ReplicatesConfig | None, report: Report) -> dict[str, SeedSummary]:
    """`diffusion@ddpm` -> its headline FID over training seeds: the main stage's, then each replicate's
    (`diffusion_replicate@ddpm-r`) that `replicates.diffusion` lists. A generator none of whose replicates has
    metrics (ldm and dit_rf have no replicate stage) keeps one seed; one missing only some is pooled over those
    it has, and the missing ones are named in `report.missing`."""
    numbers = replicates.diffusion if replicates else []
    folder = root / METRICS_DIR / "diffusion"
    stems = {p.stem for p in folder.glob("*.json")}
    out = {}
    for stem in sorted(s for s in stems if numbers and replicate_item(s, stems) is None):
        values, absent = [_read(folder / f"{stem}.json")["fid"]], []
        for name in (replicate_name(stem, r) for r in numbers):
            if name in stems:
                values.append(_read(folder / f"{name}.json")["fid"])
            else:
                absent.append(f"diffusion_replicate@{name}")
        if len(absent) < len(numbers):
            report.missing += absent
            out[f"diffusion@{stem}"] = seed_summary(values)
    return out


def weights_cell(m: dict) -> str:
    """Which weights a generator's numbers come from: the EMA (`*_train.ema_decay` > 0) or the trained ones."""
    decay = m.get("ema_decay")
    return f"EMA {decay:g}" if isinstance(decay, int | float) and decay > 0 else "raw"


def generator_rows(root: Path) -> list[tuple[str, dict]]:
    """(name, metrics) of every image generator with a metrics file that carries an FID; a replicate's
    metrics (`ddpm-1.json`) are another seed of its generator, not a row of their own."""
    metrics = root / METRICS_DIR
    rows = []
    for folder, prefix in (("diffusion", "diffusion@"), ("nflow", "nflow@")):
        paths = sorted((metrics / folder).glob("*.json"))
        stems = {p.stem for p in paths}
        for path in paths:
            if replicate_item(path.stem, stems) is not None:
                continue
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
    first = rows[0][1]
    floor, ceiling = first["fid_floor"], first["fid_ceiling"]
    seeds = generator_seeds(root, report.replicates, report)
    table = [
        "| generator | FID | over sample sets: mean [95 % interval] |"
        + (f" {GENERATOR_SEEDS_COLUMN} |" if seeds else "")
        + " class accuracy | bits/dim | weights | note |",
        "|---|---:|---:|" + ("---:|" if seeds else "") + "---:|---:|---|---|",
    ]
    for name, m in rows:
        note = f"{m.get('headline_sampler', '')} {int(m['headline_steps'])} steps" if "headline_steps" in m else ""
        acc = f"{m['class_accuracy']:.3f}" if "class_accuracy" in m else ""
        bpd = f"{m['test_bpd']:.3f}" if "test_bpd" in m else ""
        s = seeds.get(name)
        over_seeds = f" {seeds_cell(s.mean, s.low, s.high, s.n, '.3f') if s else '1 seed'} |" if seeds else ""
        table.append(
            f"| {name} | {m['fid']:.3f} | {draws_cell(m)} |{over_seeds} {acc} | {bpd} | {weights_cell(m)} | {note} |"
        )
    if "fid_floor_std" in first:
        bounds = (
            f"floor (FID of {first['fid_bound_samples']:.0f} random train images vs test, the generators' sample "
            f"size; mean ± std over {first['fid_bound_draws']:.0f} draws) {floor:.3f} ± {first['fid_floor_std']:.3f}, "
            f"noise ceiling (as many uniform-noise images) {ceiling:.1f} ± {first['fid_ceiling_std']:.1f}"
        )
    else:
        bounds = f"floor (train split vs test split) {floor:.3f}, noise ceiling (uniform noise vs test) {ceiling:.1f}"
    order = overlap_ranking([r for r in rows if r[0].startswith(("diffusion@", "nflow@"))], seeds)
    text = (
        f"## Image generation\n\nFID against the test split: {bounds}. `ldm_text` is scored on held-out caption "
        "templates and `controlnet` on the val images' edge maps (held out from training and from the FID "
        "reference), with as many samples as val has images, so neither is in the ranking below. The weights "
        "column says which weights every number of that row comes from: an exponential moving average of the "
        "training weights (decay `*_train.ema_decay`) or the trained weights themselves.\n\n"
        + "\n".join(table)
        + "\n\n"
        + (GENERATORS_OVER_SEEDS if seeds else GENERATORS_UNRANKED)
        + (f"\n\nRanking (lowest mean FID first): {order}" if order else "")
        + "\n\n![](fid.png)"
    )
    fig, ax = _figure()
    means = [m.get("fid_mean", m["fid"]) for _, m in rows][::-1]
    err = [
        [mean - m.get("fid_ci_low", mean) for mean, (_, m) in zip(means, rows[::-1])],
        [m.get("fid_ci_high", mean) - mean for mean, (_, m) in zip(means, rows[::-1])],
    ]
    err = [[v if math.isfinite(v) else 0.0 for v in side] for side in err]  # a single draw: no bar
    ax.barh([n for n, _ in rows][::-1], means, xerr=err, capsize=2)
    ax.axvline(floor, color="gray", linestyle="--", label=f"floor {floor:.2f}")
    ax.axvline(ceiling, color="red", linestyle=":", label=f"noise ceiling {ceiling:.0f}")
    ax.set(xscale="log", xlabel="FID vs test (log)", title="Image generators")
    ax.legend(fontsize=7)
    fig.tight_layout()
    report.figures["fid.png"] = fig
    # ControlNet and the text model are scored on other conditions and sample counts than the rest.
    best = min((r for r in rows if r[0] not in ("controlnet", "ldm_text")), key=lambda r: r[1]["fid"])
    line = f"image generators: lowest FID {best[1]['fid']:.3f} ({best[0]})"
    if order:
        line += f"; by mean over sample sets, {order}"
    report.headline.append(f"{line}; floor {floor:.3f}, noise ceiling {ceiling:.1f}")

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
        paired = [k for k in kinds if f"{k}_minus_unguided_test_fid_mean" in chosen]
        if paired:
            lines += [
                "",
                "| guidance | selected scale | test FID, mean [95 %] | unguided (scale 0) | selected minus unguided "
                "[95 %, paired] | verdict |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for k in paired:
                diff = with_interval(
                    chosen[f"{k}_minus_unguided_test_fid_mean"],
                    chosen[f"{k}_minus_unguided_test_fid_ci_low"],
                    chosen[f"{k}_minus_unguided_test_fid_ci_high"],
                    "+.3f",
                )
                low, high = (chosen[f"{k}_minus_unguided_test_fid_ci_{e}"] for e in ("low", "high"))
                if chosen[f"{k}_selected_scale"] == 0:
                    verdict = "selected no guidance"
                elif not (math.isfinite(low) and math.isfinite(high)):
                    verdict = "single draw: untested"
                elif high < 0:
                    verdict = "guidance lowers FID"
                elif low > 0:
                    verdict = "guidance raises FID"
                else:
                    verdict = f"{NOT_SIGNIFICANT} (not significant)"
                cells = [
                    f"{chosen[f'{k}_selected_scale']:g}",
                    draws_cell({f"fid_{e}": chosen[f"{k}_selected_test_fid_{e}"] for e in DRAW_KEYS}),
                    draws_cell({f"fid_{e}": chosen[f"{k}_unguided_test_fid_{e}"] for e in DRAW_KEYS}),
                    diff,
                    verdict,
                ]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
        val_images = chosen.get("val_fid_reference_images")
        note = f" ({val_images:.0f} val images)" if val_images else ""
        text += (
            "\n\n### Guidance scale (DDPM)\n\nThe sweep is scored against the val split"
            + note
            + "; each kind's scale is selected by val FID and only that scale is scored on test, over independent "
            "sample sets, each paired with an unguided set from the same initial noise.\n\n"
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
        text += (
            "\n\n### DiT-RF against the UNet DDPM at equal steps (FID)\n\nOne sample set per cell: no interval, "
            "so a small difference between two cells may be sampling noise.\n\n" + "\n".join(lines)
        )
    control = _read(root / METRICS_DIR / "controlnet.json")
    if control and "fid_control_minus_base_mean" in control:
        fid_diff = with_interval(
            control["fid_control_minus_base_mean"],
            control["fid_control_minus_base_ci_low"],
            control["fid_control_minus_base_ci_high"],
            "+.3f",
        )
        f1_gain = with_interval(
            control["edge_f1_control_minus_base"],
            control["edge_f1_control_minus_base_ci_low"],
            control["edge_f1_control_minus_base_ci_high"],
            "+.3f",
        )
        lines = [
            "| | with control | base alone | control minus base [95 %] |",
            "|---|---:|---:|---:|",
            f"| FID vs test, mean over sample sets | {draws_cell(control)} | "
            f"{draws_cell({f'fid_{e}': control[f'fid_base_{e}'] for e in DRAW_KEYS})} | {fid_diff} |",
            f"| edge F1 (1 px tolerance) | {control['edge_f1_control']:.3f} | {control['edge_f1_base']:.3f} "
            f"| {f1_gain} |",
        ]
        text += (
            f"\n\n### ControlNet (held-out conditions)\n\nConditioned on the edge maps of "
            f"{control['condition_images']:.0f} val images, which neither the training data nor the FID reference "
            "hold; the base model samples the same labels from the same noise. The FID difference is paired over "
            "sample sets, the edge-F1 interval is a bootstrap over the condition images.\n\n" + "\n".join(lines)
        )
    ablation = _read(root / METRICS_DIR / "dit_ablation.json")
    if ablation:
        lines = [
            "| variant | FID | over sample sets: mean [95 % interval] | class accuracy | latent channels |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in ablation["variants"]:
            cells = [f"{r['fid']:.3f}", draws_cell(r), f"{r['class_accuracy']:.3f}", str(r["latent_channels"])]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
        text += (
            "\n\n### DiT-RF: SD3 design choices, one at a time\n\n" + GENERATORS_UNRANKED + "\n\n" + "\n".join(lines)
        )
    report.sections.append(text)


def detection(root: Path, report: Report) -> None:
    summaries = _read(root / METRICS_DIR / "map.json")
    if not summaries:
        report.missing.append("detection")
        return
    onnx = _read(root / METRICS_DIR / "onnx.json") or {}
    seeded = any(int(m.get("AP_seeds", 1)) > 1 for m in summaries.values())  # map writes AP_seeds: 1 without replicates
    table = [
        "| detector | AP | AP50 | AP75 | AR100 | eager p50 ms | onnxruntime p50 ms | int8 p50 ms |"
        + (" AP over seeds | AP50 over seeds |" if seeded else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if seeded else ""),
    ]
    for name, m in summaries.items():
        o = onnx.get(name, {})
        lat = [o.get(k, {}).get("p50_ms") for k in ("latency_torch", "latency_onnx_fp32", "latency_onnx_int8")]
        cells = " | ".join(f"{v:.2f}" if v is not None else "" for v in lat)
        ap, ap50 = (with_interval(m[s], m.get(f"{s}_ci_low"), m.get(f"{s}_ci_high"), ".3f") for s in ("AP", "AP50"))
        line = f"| {name} | {ap} | {ap50} | {m['AP75']:.3f} | {m['AR100']:.3f} | {cells} |"
        if seeded:
            line += "".join(
                " "
                + seeds_cell(
                    *(m.get(f"{s}_seed_{k}") for k in ("mean", "ci_low", "ci_high")), m.get(f"{s}_seeds"), ".3f"
                )
                + " |"
                for s in ("AP", "AP50")
            )
        table.append(line)
    text = "## Detection\n\nCOCO metrics on the test scenes; batch-1 latency.\n\n" + "\n".join(table)
    if any("AP_ci_low" in m for m in summaries.values()):
        text += (
            "\n\nIn brackets: the 95 % percentile interval over bootstrap resamples of the test images "
            "(`params/detection.yaml: map.resamples`; an image drawn twice counts as two), the same resamples for "
            "both detectors. It covers the choice of test images only, not training-seed variance."
        )
    if seeded:
        text += (
            " Over seeds: the mean of the detector trained with seed `runtime.seed` (`detector@*`, the first "
            "columns) and with `runtime.seed + r` for each r in `params/replicates.yaml: replicates.detector` "
            "(`detector_replicate@*`), each scored on the whole test split, with the 95 % Student-t interval of "
            "that mean: what retraining with another seed changes."
        )
    pairs = _csv_rows(root / PLOTS_DIR / "map_pairs.csv")
    if pairs:
        lines = ["| comparison | stat | difference [95 % interval] | verdict |", "|---|---|---:|---|"]
        for p in pairs:
            cell = with_interval(float(p["difference"]), p["ci_low"], p["ci_high"], "+.3f")
            higher = p["a"] if float(p["difference"]) > 0 else p["b"]
            lines.append(f"| {p['a']} minus {p['b']} | {p['stat']} | {cell} | {verdict_cell(p, higher, 'higher')} |")
        text += (
            "\n\nPaired differences over the same resamples. A difference whose interval contains 0 is "
            f"{NOT_SIGNIFICANT}: the test images cannot tell the detectors apart on that figure. So is one whose "
            "two intervals over seeds overlap: retraining could change the order.\n\n" + "\n".join(lines)
        )
        if not seeded:
            text += "\n\n" + one_seed_caveat("detector")
    report.sections.append(text + "\n\n![](detection.png)")
    fig, ax = _figure()
    names = list(summaries)
    for stat, label in (("AP50", "AP50"), ("AP", "AP@[.5:.95]")):
        values = [summaries[n][stat] for n in names]
        err = None
        if all(f"{stat}_ci_low" in summaries[n] for n in names):
            err = [
                [summaries[n][stat] - summaries[n][f"{stat}_ci_low"] for n in names],
                [summaries[n][f"{stat}_ci_high"] - summaries[n][stat] for n in names],
            ]
        ax.bar(names, values, yerr=err, capsize=3, label=label)
    ax.set(ylim=(0, 1), ylabel="test", title="Detectors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    report.figures["detection.png"] = fig
    best = max(summaries, key=lambda n: summaries[n]["AP50"])
    line = f"detectors: highest AP50 {summaries[best]['AP50']:.3f} ({best})"
    tie = next((p for p in pairs if p["stat"] == "AP50" and best in (p["a"], p["b"]) and not _significant(p)), None)
    if tie is not None:
        other = tie["b"] if tie["a"] == best else tie["a"]
        line += f", not significantly above {other} ({summaries[other]['AP50']:.3f})"
    report.headline.append(line)


def contamination(root: Path, report: Report) -> None:
    """What each split shares with train, from the corpus stage and the two audit stages."""
    corpus = _read(root / METRICS_DIR / "corpus.json")
    images = _read(root / METRICS_DIR / "image_audit.json")
    scenes = _read(root / METRICS_DIR / "scene_audit.json")
    if not (corpus or images or scenes):
        report.missing.append("contamination audits")
        return
    lines = ["| data | split | compared | found in train | share |", "|---|---|---:|---:|---:|"]
    if corpus:
        for split in ("val", "test"):
            removed = corpus.get(f"removed_{split}_sentences", 0.0)
            lines.append(
                f"| text | {split} | {corpus[f'{split}_sentences'] + removed:.0f} sentences | {removed:.0f} removed "
                f"(verbatim in an earlier split) | {corpus[f'{split}_sentences_in_train_share']:.4f} left |"
            )
        share = corpus.get("test_word_13grams_in_train_share")
        if share is not None:
            lines.append(f"| text | test | 13-grams with a word | | {share:.4f} |")
    for data, metrics, unit in (("images", images, "images"), ("scene digits", scenes, "digits")):
        for split in ("val", "test") if metrics else ():
            n = metrics[f"{split}_{unit}_audited"]
            for kind in ("exact", "near"):
                hits = metrics[f"{split}_{unit}_{kind}_in_train"]
                share = metrics[f"{split}_{unit}_{kind}_in_train_share"]
                lines.append(f"| {data} | {split} | {n:.0f} {unit} | {hits:.0f} {kind} | {share:.4f} |")
    report.sections.append(
        "## Splits and contamination\n\nWhat val and test share with train. Text: sentences found verbatim in an "
        "earlier split are removed by the corpus stage (train keeps its copy), and the share of test 13-grams "
        "with a word seen in train is audited. Images and the digits the scenes are drawn from: identical pixels "
        "(exact) or a 64-bit perceptual hash within the audit's Hamming threshold (near, exact included).\n\n"
        + "\n".join(lines)
    )


SECTIONS: list[Callable[[Path, Report], None]] = [language_models, image_generation, detection, contamination]


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
    return [*profile_line(root), f"Commit: {git_commit(root)}", f"Generated: {when}", REPRODUCIBILITY]


# Which figures a rerun reproduces bit for bit (README, Reproducibility).
REPRODUCIBILITY = (
    "Reruns: the data splits and their audits are bit-identical on machines of this kind given the same "
    "`requirements.lock`; every figure of a trained model (perplexities, FIDs, bits/dim, class accuracies, mAP) "
    "carries a run-to-run spread besides its interval, since CPU float sums follow the thread count each stage "
    "gets (`runtime.threads` fixes it); timings always vary."
)


def build_report(root: Path, replicates: ReplicatesConfig | None = None) -> Report:
    report = Report(header=provenance(root), replicates=replicates)
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


@dataclass(frozen=True)
class ReportInputs:
    replicates: ReplicatesConfig  # the image generators' replicates the report pools (LM and detector: upstream)


@task(name="report", cache_policy=NO_CACHE)
def report_task(ctx: StageContext, inputs: ReportInputs) -> dict[str, float]:
    root, run = ctx.root, ctx.run
    from prefect.artifacts import create_markdown_artifact

    report = build_report(root, inputs.replicates)
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


SPEC = StageSpec(
    name="report",
    family="report",
    task=report_task,
    inputs=ReportInputs,
    seeded=False,
    runtime_keys=("profile",),
)
