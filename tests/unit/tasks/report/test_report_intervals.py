"""The report's comparison tables carry the stages' intervals as `value [low, high]` and rank two models only
when the paired interval of their difference excludes 0; the others are marked n.s."""

from __future__ import annotations

import json

from tasks.report.report import build_report, draws_cell, overlap_ranking, ranking_line, weights_cell
from tasks.spec import ReplicatesConfig


def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


LM_TABLE = (
    ("model,family,test_perplexity,test_perplexity_stream,parameters,test_perplexity_ci_low,test_perplexity_ci_high\n")
    + """unigram,ngram,86.4,,,61.6,133.0
kn5,ngram,14.72,,,8.66,29.27
lstm,neural,14.45,14.32,433311.0,8.45,28.97
mamba,neural,20.12,19.69,532224.0,11.15,43.94
"""
)
LM_PAIRS = """pair,better,worse,log_perplexity_difference,ci_low,ci_high,significant,why
kn5 vs lstm,lstm,kn5,0.0186,-0.0156,0.0472,False,adjacent in the ranking; kn5 against the neural LMs
mamba vs kn5,kn5,mamba,0.3128,0.2381,0.4193,True,adjacent in the ranking; kn5 against the neural LMs
unigram vs mamba,mamba,unigram,1.4576,1.0930,1.7217,True,adjacent in the ranking
"""
MAP = {
    "thundernet": {
        "AP": 0.448,
        "AP50": 0.618,
        "AP75": 0.555,
        "AR100": 0.681,
        "AP_ci_low": 0.431,
        "AP_ci_high": 0.472,
        "AP50_ci_low": 0.596,
        "AP50_ci_high": 0.647,
    },
    "one_stage": {
        "AP": 0.464,
        "AP50": 0.6175,
        "AP75": 0.559,
        "AR100": 0.730,
        "AP_ci_low": 0.447,
        "AP_ci_high": 0.490,
        "AP50_ci_low": 0.597,
        "AP50_ci_high": 0.647,
    },
}
MAP_PAIRS = """pair,a,b,stat,difference,ci_low,ci_high,significant
thundernet - one_stage,thundernet,one_stage,AP,-0.016,-0.035,-0.002,True
thundernet - one_stage,thundernet,one_stage,AP50,0.0005,-0.026,0.026,False
"""


def test_language_models_show_intervals_and_do_not_rank_what_is_not_significant(tmp_path):
    _write(tmp_path, "data/plots/lm_compare.csv", LM_TABLE)
    _write(tmp_path, "data/plots/lm_compare_pairs.csv", LM_PAIRS)
    report = build_report(tmp_path)
    text = report.markdown()
    assert "| kn5 | 14.72 [8.66, 29.27] |  |" in text and "| lstm | 14.45 [8.45, 28.97] | 14.32 |" in text
    assert "| kn5 vs lstm | +0.019 [-0.016, +0.047] | n.s. (not significant) |" in text
    assert "| mamba vs kn5 | +0.313 [+0.238, +0.419] | kn5 lower |" in text
    assert "lstm ~ kn5 < mamba < unigram" in text
    assert "not training-seed variance" in text and "Over seeds" not in text  # no replicates: no column
    # ... and the verdicts are said to hold for one trained model, with the key that adds seeds
    assert "One trained model each: `params/replicates.yaml: replicates.lm`" in text
    assert (
        report.headline[0]
        == "language models: lowest test perplexity 14.45 (lstm), not significantly below kn5 (14.72)"
    )


def test_detection_shows_intervals_and_the_paired_difference(tmp_path):
    _write(tmp_path, "data/metrics/map.json", json.dumps(MAP))
    _write(tmp_path, "data/plots/map_pairs.csv", MAP_PAIRS)
    report = build_report(tmp_path)
    text = report.markdown()
    assert "| thundernet | 0.448 [0.431, 0.472] | 0.618 [0.596, 0.647] | 0.555 | 0.681 |  |  |  |" in text
    assert "| thundernet minus one_stage | AP | -0.016 [-0.035, -0.002] | one_stage higher |" in text
    assert "| thundernet minus one_stage | AP50 | +0.001 [-0.026, +0.026] | n.s. (not significant) |" in text
    assert "One trained model each: `params/replicates.yaml: replicates.detector`" in text
    assert (
        report.headline[-1] == "detectors: highest AP50 0.618 (thundernet), not significantly above one_stage (0.618)"
    )


SEED_COLUMNS = ",seeds,test_perplexity_seed_mean,test_perplexity_seed_ci_low,test_perplexity_seed_ci_high"
LM_SEEDS = {
    "unigram": "1,86.4,86.4,86.4",
    "kn5": "1,14.72,14.72,14.72",
    "lstm": "3,14.6,14.1,15.1",
    "mamba": "3,20.3,19.0,21.6",
}


def test_seed_intervals_add_a_column_and_veto_a_ranking_they_overlap(tmp_path):
    """With replicates, each neural LM shows its mean over seeds; a pair the bootstrap separates but whose seed
    intervals overlap is n.s. (seed intervals overlap), and the ranking shows `~` there."""
    lines = LM_TABLE.splitlines()
    table = [lines[0] + SEED_COLUMNS] + [f"{line},{LM_SEEDS[line.split(',')[0]]}" for line in lines[1:]]
    pairs = LM_PAIRS.splitlines()
    pairs = [pairs[0] + ",seed_separated", pairs[1] + ",False", pairs[2] + ",True", pairs[3] + ",False"]
    _write(tmp_path, "data/plots/lm_compare.csv", "\n".join(table) + "\n")
    _write(tmp_path, "data/plots/lm_compare_pairs.csv", "\n".join(pairs) + "\n")
    text = build_report(tmp_path).markdown()
    assert "| lstm | 14.45 [8.45, 28.97] | 14.32 | 14.60 [14.10, 15.10] (3 seeds) |" in text
    assert "| kn5 | 14.72 [8.66, 29.27] |  | deterministic |" in text
    assert "| mamba vs kn5 | +0.313 [+0.238, +0.419] | kn5 lower |" in text  # both say so
    assert "| unigram vs mamba | +1.458 [+1.093, +1.722] | n.s. (seed intervals overlap) |" in text
    assert "lstm ~ kn5 < mamba ~ unigram" in text
    assert "replicates.lm" in text and "One trained model each" not in text


def test_detection_shows_seed_intervals_and_their_veto(tmp_path):
    seeded = {
        name: {
            **m,
            "AP_seeds": 3,
            "AP50_seeds": 3,
            "AP_seed_mean": m["AP"],
            "AP_seed_ci_low": m["AP"] - 0.05,
            "AP_seed_ci_high": m["AP"] + 0.05,
            "AP50_seed_mean": m["AP50"],
            "AP50_seed_ci_low": m["AP50"] - 0.05,
            "AP50_seed_ci_high": m["AP50"] + 0.05,
        }
        for name, m in MAP.items()
    }
    pairs = MAP_PAIRS.splitlines()
    pairs = [pairs[0] + ",seed_separated", pairs[1] + ",False", pairs[2] + ",False"]
    _write(tmp_path, "data/metrics/map.json", json.dumps(seeded))
    _write(tmp_path, "data/plots/map_pairs.csv", "\n".join(pairs) + "\n")
    report = build_report(tmp_path)
    text = report.markdown()
    assert "|  |  |  | 0.448 [0.398, 0.498] (3 seeds) | 0.618 [0.568, 0.668] (3 seeds) |" in text
    assert "| thundernet minus one_stage | AP | -0.016 [-0.035, -0.002] | n.s. (seed intervals overlap) |" in text
    assert "replicates.detector" in text and "One trained model each" not in text


def test_tables_without_intervals_show_the_values_alone(tmp_path):
    # Metrics from before the stages computed intervals: the values, no brackets, no pairs, no claim.
    _write(tmp_path, "data/plots/lm_compare.csv", "model,family,test_perplexity\nkn5,ngram,10.9\nlstm,neural,11.2\n")
    _write(
        tmp_path,
        "data/metrics/map.json",
        json.dumps({"thundernet": {"AP": 0.5, "AP50": 0.6, "AP75": 0.55, "AR100": 0.7}}),
    )
    report = build_report(tmp_path)
    text = report.markdown()
    assert "| kn5 | 10.90 |  |" in text and "[" not in text.split("## Language models")[1].split("![]")[0]
    assert "| thundernet | 0.500 | 0.600 | 0.550 | 0.700 |" in text and "Paired" not in text
    assert report.headline == [
        "language models: lowest test perplexity 10.90 (kn5)",
        "detectors: highest AP50 0.600 (thundernet)",
    ]


def test_ranking_line_and_generator_draws():
    pairs = [
        {"better": "a", "worse": "b", "significant": "True"},
        {"better": "b", "worse": "c", "significant": "False"},
    ]
    assert ranking_line(["a", "b", "c", "d"], pairs) == "a < b ~ c ~ d"  # c, d untested: not ranked
    assert draws_cell({"fid": 1.0}) == "single draw"
    assert (
        draws_cell({"fid": 1.0, "fid_mean": 1.1, "fid_ci_low": float("nan"), "fid_ci_high": float("nan")})
        == "single draw"
    )
    assert (
        draws_cell({"fid_mean": 1.1, "fid_ci_low": 0.9, "fid_ci_high": 1.3, "fid_draws": 3.0})
        == "1.100 [0.900, 1.300] (3 sets)"
    )


def test_generators_rank_only_where_sample_set_intervals_do_not_overlap():
    rows = [
        ("diffusion@a", {"fid_mean": 1.0, "fid_ci_low": 0.9, "fid_ci_high": 1.1}),
        ("diffusion@b", {"fid_mean": 1.05, "fid_ci_low": 0.95, "fid_ci_high": 1.15}),  # overlaps a
        ("nflow@c", {"fid_mean": 2.0, "fid_ci_low": 1.8, "fid_ci_high": 2.2}),  # clear of b
        ("nflow@d", {"fid_mean": 0.5, "fid_ci_low": float("nan"), "fid_ci_high": float("nan")}),  # one draw
    ]
    assert overlap_ranking(rows) == "diffusion@a ~ diffusion@b < nflow@c"
    assert weights_cell({"ema_decay": 0.999}) == "EMA 0.999" and weights_cell({"ema_decay": 0.0}) == "raw"


def test_guidance_and_controlnet_show_their_paired_comparisons(tmp_path):
    spread = {"draws": 3.0, "mean": 2.0, "std": 0.1, "ci_low": 1.8, "ci_high": 2.2}
    guidance = {
        "classifier_selected_scale": 4.0,
        "classifier_selected_test_fid": 2.1,
        "classifier_selected_test_class_accuracy": 0.9,
        **{f"classifier_selected_test_fid_{k}": v for k, v in spread.items()},
        **{
            f"classifier_unguided_test_fid_{k}": v + (1.0 if k != "draws" and k != "std" else 0)
            for k, v in spread.items()
        },
        "classifier_minus_unguided_test_fid_mean": -1.0,
        "classifier_minus_unguided_test_fid_ci_low": -1.2,
        "classifier_minus_unguided_test_fid_ci_high": -0.8,
    }
    (tmp_path / "data/metrics/diffusion").mkdir(parents=True)
    (tmp_path / "data/plots").mkdir(parents=True)
    (tmp_path / "data/metrics/guidance.json").write_text(json.dumps(guidance))
    (tmp_path / "data/plots/guidance.csv").write_text(
        "guidance,scale,val_fid,val_class_accuracy,nfe,sample_seconds,selected\n"
        "classifier,0.0,3.0,0.5,25,1,False\nclassifier,4.0,2.0,0.9,25,1,True\n"
    )
    (tmp_path / "data/metrics/diffusion/ddpm.json").write_text(
        json.dumps({"fid": 1.0, "fid_floor": 0.3, "fid_ceiling": 200.0, "ema_decay": 0.999})
    )
    control = {
        "fid": 1.5,
        "fid_base": 1.2,
        "fid_floor": 0.3,
        "fid_ceiling": 200.0,
        "condition_images": 270.0,
        "edge_f1_control": 0.96,
        "edge_f1_base": 0.89,
        "edge_f1_control_minus_base": 0.07,
        "edge_f1_control_minus_base_ci_low": 0.06,
        "edge_f1_control_minus_base_ci_high": 0.08,
        **{f"fid_{k}": v for k, v in spread.items()},
        **{f"fid_base_{k}": v for k, v in spread.items()},
        "fid_control_minus_base_mean": 0.3,
        "fid_control_minus_base_ci_low": -0.1,
        "fid_control_minus_base_ci_high": 0.7,
    }
    (tmp_path / "data/metrics/controlnet.json").write_text(json.dumps(control))
    text = build_report(tmp_path).markdown()
    assert (
        "| classifier | 4 | 2.000 [1.800, 2.200] (3 sets) | 3.000 [2.800, 3.200] (3 sets) "
        "| -1.000 [-1.200, -0.800] | guidance lowers FID |" in text
    )
    assert (
        "| FID vs test, mean over sample sets | 2.000 [1.800, 2.200] (3 sets) | 2.000 [1.800, 2.200] (3 sets) "
        "| +0.300 [-0.100, +0.700] |" in text
    )
    assert "| edge F1 (1 px tolerance) | 0.960 | 0.890 | +0.070 [+0.060, +0.080] |" in text
    assert "| diffusion@ddpm | 1.000 | single draw |  |  | EMA 0.999 |  |" in text


def _generator(root, name, fid, half=0.05, **extra):
    spread = {"fid_mean": fid, "fid_ci_low": fid - half, "fid_ci_high": fid + half, "fid_draws": 3.0}
    bounds = {"fid_floor": 0.3, "fid_ceiling": 200.0, "ema_decay": 0.999}
    _write(root, f"data/metrics/diffusion/{name}.json", json.dumps({"fid": fid, **spread, **bounds, **extra}))


def test_generator_replicates_pool_into_an_interval_over_seeds_that_gates_the_ranking(tmp_path):
    """`replicates.diffusion: [1, 2]`: ddpm's FID over its three seeds is 1.0, 1.4, 1.2, so mean 1.2 and the
    Student-t interval 1.2 ± t(0.975, 2) · 0.2 / sqrt(3) = [0.703, 1.697]. sde_vp is clear of ddpm over sample
    sets but not over seeds, so they are not ranked; ldm has no replicate and ranks on its sample sets."""
    for name, fid in (("ddpm", 1.0), ("ddpm-1", 1.4), ("ddpm-2", 1.2), ("sde_vp", 2.0), ("sde_vp-1", 2.1)):
        _generator(tmp_path, name, fid)
    _generator(tmp_path, "sde_vp-2", 1.3)
    _generator(tmp_path, "ldm", 3.0)
    _generator(tmp_path, "ddpm-3", 9.0)  # left by an earlier run with more replicates: not pooled
    listed = ReplicatesConfig(lm=[], detector=[], diffusion=[1, 2])
    report = build_report(tmp_path, listed)
    text = report.markdown()
    assert "| diffusion@ddpm | 1.000 | 1.000 [0.950, 1.050] (3 sets) | 1.200 [0.703, 1.697] (3 seeds) |" in text
    assert "| diffusion@sde_vp | 2.000 | 2.000 [1.950, 2.050] (3 sets) | 1.800 [0.717, 2.883] (3 seeds) |" in text
    assert "| diffusion@ldm | 3.000 | 3.000 [2.950, 3.050] (3 sets) | 1 seed |" in text
    assert "diffusion@ddpm-" not in text and "diffusion@sde_vp-" not in text  # a replicate is not a row
    assert "Ranking (lowest mean FID first): diffusion@ddpm ~ diffusion@sde_vp < diffusion@ldm" in text
    assert not [m for m in report.missing if "replicate" in m]

    alone = build_report(tmp_path).markdown()  # no replicates listed: one seed each, no column
    assert "over training seeds" not in alone and "diffusion@ddpm-" not in alone
    assert "diffusion@ddpm < diffusion@sde_vp < diffusion@ldm" in alone

    more = build_report(tmp_path, ReplicatesConfig(lm=[], detector=[], diffusion=[1, 2, 4]))
    assert [m for m in more.missing if "replicate" in m] == [
        "diffusion_replicate@ddpm-4",
        "diffusion_replicate@sde_vp-4",
    ]


def test_one_seed_columns_are_no_seed_interval_and_the_verdicts_carry_the_caveat(tmp_path):
    """A profile without replicates: lm_compare still writes its seed columns (1 seed each) and map its
    `AP_seeds: 1`. That is no interval over seeds: no seed column, no "Over seeds" text, and the verdicts say
    they hold for one trained model each."""
    lines = LM_TABLE.splitlines()
    # seeds 1, the mean is the model's own perplexity, no interval
    table = [lines[0] + SEED_COLUMNS] + [f"{line},1,{line.split(',')[2]},," for line in lines[1:]]
    pairs = LM_PAIRS.splitlines()
    pairs = [pairs[0] + ",seed_separated"] + [p + "," for p in pairs[1:]]
    _write(tmp_path, "data/plots/lm_compare.csv", "\n".join(table) + "\n")
    _write(tmp_path, "data/plots/lm_compare_pairs.csv", "\n".join(pairs) + "\n")
    single = {name: {**m, "AP_seeds": 1, "AP50_seeds": 1} for name, m in MAP.items()}
    _write(tmp_path, "data/metrics/map.json", json.dumps(single))
    _write(tmp_path, "data/plots/map_pairs.csv", MAP_PAIRS)
    text = build_report(tmp_path).markdown()
    assert "Over seeds:" not in text and "over seeds, mean" not in text and "1 seed" not in text
    assert "| mamba vs kn5 | +0.313 [+0.238, +0.419] | kn5 lower |" in text
    assert "One trained model each: `params/replicates.yaml: replicates.lm`" in text
    assert "| thundernet minus one_stage | AP | -0.016 [-0.035, -0.002] | one_stage higher |" in text
    assert "One trained model each: `params/replicates.yaml: replicates.detector`" in text
