"""dvc.yaml and the code agree: every stage runs its own flow and writes where the code says."""

from ruamel.yaml import YAML

from flows.stages import STAGE_FLOWS, stage_flow
from tasks import layout


def test_every_stage_cmd_runs_its_registered_flow(repo_root):
    stages = YAML(typ="safe").load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"kiln stage {name}"
        assert name.partition("@")[0] in STAGE_FLOWS
        assert callable(stage_flow(name))


def test_stage_outputs_are_the_layout_paths(repo_root):
    stages = YAML(typ="safe").load((repo_root / "dvc.yaml").read_text())["stages"]

    def outs(name):
        entries = stages[name].get("outs", []) + stages[name].get("metrics", []) + stages[name].get("plots", [])
        return {e if isinstance(e, str) else next(iter(e)) for e in entries}

    assert outs("corpus") == {layout.CORPUS_DIR, f"{layout.METRICS_DIR}/corpus.json"}
    assert outs("ngram") == {layout.NGRAM_DIR, f"{layout.METRICS_DIR}/ngram.json",
                             f"{layout.PLOTS_DIR}/ngram_perplexity.csv"}
    for name in stages:
        assert all(path.startswith("data/") for path in outs(name))
