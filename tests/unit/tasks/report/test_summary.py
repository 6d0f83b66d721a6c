"""`kiln summary`: the headline figures, read from the stages' metrics files."""

import json


def test_summary_reads_the_metrics_files(tmp_path):
    from tasks.report.summary import headline

    assert headline(tmp_path) == "no metrics yet: run `kiln run`"
    (tmp_path / "data/plots").mkdir(parents=True)
    (tmp_path / "data/plots/lm_compare.csv").write_text(
        "model,family,test_perplexity,test_perplexity_stream\nunigram,ngram,104.4,\nlstm,neural,16.8,18.25\n"
    )
    (tmp_path / "data/metrics").mkdir(parents=True)
    (tmp_path / "data/metrics/map.json").write_text(
        '{"thundernet": {"AP": 0.5, "AP50": 0.6, "AP75": 0.55, "AR100": 0.7}}'
    )
    text = headline(tmp_path)
    lines = text.splitlines()
    label = "test perplexity (context from each sentence's <s>, as the n-gram)"
    assert lines[1].split() == ["model", *label.split(), "stream", "context"]
    assert lines[2].split() == ["unigram", "104.40"] and lines[3].split() == ["lstm", "16.80", "18.25"]
    assert lines[3].index("16.80") + 5 == lines[1].index("n-gram)") + 7  # the numbers under their labels
    assert lines[3].index("18.25") + 5 == len(lines[1])
    assert "thundernet    0.500  0.600  0.550  0.700          nan" in text


def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_report_collects_every_family_and_names_what_is_missing(tmp_path):
    from tasks.report.report import build_report
    from tasks.report.summary import headline

    _write(tmp_path, "data/plots/lm_compare.csv", "model,family,test_perplexity\nunigram,ngram,104.4\nkn5,ngram,10.9\n")
    fid = {
        "fid_floor": 0.25,
        "fid_ceiling": 219.0,
        "class_accuracy": 0.97,
        "headline_sampler": "ancestral",
        "headline_steps": 50,
    }
    _write(tmp_path, "data/metrics/diffusion/ddpm.json", json.dumps({**fid, "fid": 0.64}))
    _write(
        tmp_path,
        "data/metrics/nflow/realnvp.json",
        json.dumps({"fid": 3.5, "fid_floor": 0.25, "fid_ceiling": 219.0, "test_bpd": 1.234}),
    )
    _write(
        tmp_path,
        "data/plots/guidance.csv",
        "guidance,scale,val_fid,val_class_accuracy,nfe,sample_seconds,selected\n"
        "classifier_free,0.0,21.6,0.09,50,1,False\nclassifier_free,2.0,2.45,1.0,50,1,True\n",
    )
    _write(
        tmp_path,
        "data/metrics/diffusion/dit_rf.json",
        json.dumps(
            {
                **fid,
                "fid": 1.3,
                "headline_sampler": "euler",
                "headline_steps": 2,
                "sweep": [
                    {"sampler": "euler", "steps": 1, "fid": 4.3},
                    {"sampler": "euler", "steps": 2, "fid": 2.4},
                    {"sampler": "ldm_ddim", "steps": 1, "fid": 72.2},
                    {"sampler": "ldm_ddim", "steps": 2, "fid": 59.5},
                ],
            }
        ),
    )
    report = build_report(tmp_path)
    text = report.markdown()
    assert "| kn5 | 10.90 |  |" in text and "| unigram | 104.40 |  |" in text  # no stream column: left empty
    assert "| model | test perplexity (context from each sentence's `<s>`, as the n-gram) | stream context |" in text
    assert "| diffusion@ddpm | 0.640 | single draw | 0.970 |  | raw | ancestral 50 steps |" in text
    assert "| nflow@realnvp | 3.500 | single draw |  | 1.234 | raw |  |" in text
    assert "Generators are ranked by that mean only where their intervals do not overlap" in text
    assert "floor (train split vs test split) 0.250, noise ceiling (uniform noise vs test) 219.0" in text
    assert "| classifier_free | 2 | 2.450 | 1.000 | yes |" in text
    assert "| sampler | 1 steps | 2 steps |" in text and "| ldm_ddim | 72.200 | 59.500 |" in text
    assert "_Not in this report (no metrics yet): detection, contamination audits._" in text
    assert set(report.figures) == {"lm_perplexity.png", "fid.png", "guidance.png"}
    assert report.headline[1] == (
        "image generators: lowest FID 0.640 (diffusion@ddpm); floor 0.250, noise ceiling 219.0"
    )
    summary = headline(tmp_path)
    assert "diffusion@ddpm        0.640" in summary and "floor 0.250, noise ceiling 219.0" in summary


def test_summary_names_the_profile_and_labels_smoke_figures(tmp_path, repo_root):
    from tasks.report.summary import headline

    runtime = (repo_root / "params/runtime.yaml").read_text()
    _write(tmp_path, "data/metrics/map.json", '{"thundernet": {"AP": 0.5, "AP50": 0.6, "AP75": 0.55, "AR100": 0.7}}')
    for profile, label in (("default", "Profile: default"), ("smoke", "Profile: smoke (seconds-sized")):
        text = runtime.replace("profile: default", f"profile: {profile}").replace(
            "profile: smoke", f"profile: {profile}"
        )
        _write(tmp_path, "params/runtime.yaml", text)
        first = headline(tmp_path).splitlines()[0]
        assert first.startswith(label), first


def test_report_header_gives_profile_commit_and_date(tmp_path, repo_root):
    import re
    import subprocess

    from tasks.report.report import build_report

    runtime = (repo_root / "params/runtime.yaml").read_text()
    smoke = runtime.replace("profile: default", "profile: smoke")
    _write(tmp_path, "params/runtime.yaml", smoke)
    _write(tmp_path, "data/metrics/map.json", '{"thundernet": {"AP": 0.5, "AP50": 0.6, "AP75": 0.55, "AR100": 0.7}}')
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    lines = build_report(tmp_path).markdown().splitlines()
    assert lines[0] == "# Kiln report"
    assert lines[2].startswith("Profile: smoke (seconds-sized"), lines[2]
    assert lines[3] == f"Commit: {sha}  ", lines[3]
    assert re.fullmatch(r"Generated: \d{4}-\d\d-\d\d \d\d:\d\d UTC  ", lines[4]), lines[4]
    assert lines[5].startswith("Reruns: the data splits and their audits are bit-identical"), lines[5]


def test_report_html_is_one_page_with_its_tables_and_plots_inline():
    import base64

    from tasks.report.report import report_html

    png = b"\x89PNG\r\n\x1a\nfake"
    markdown = "# Kiln report\n\n| model | ppl |\n|---|---:|\n| kn5 | 10.9 |\n\n![](fid.png)\n"
    html = report_html(markdown, {"fid.png": png})
    assert "<table>" in html and "<td>kn5</td>" in html and "<h1>Kiln report</h1>" in html
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert 'src="fid.png"' not in html  # no link left that MLflow's artifact view cannot follow


def test_report_lists_the_contamination_audits(tmp_path):
    from tasks.report.report import build_report

    corpus = {"val_sentences": 330.0, "removed_val_sentences": 130.0, "val_sentences_in_train_share": 0.0}
    corpus |= {"test_sentences": 326.0, "removed_test_sentences": 164.0, "test_sentences_in_train_share": 0.0}
    corpus |= {"test_word_13grams_in_train_share": 0.0041}
    images = {
        f"{split}_images_{k}": v
        for split in ("val", "test")
        for k, v in (("audited", 10.0), ("exact_in_train", 1.0), ("exact_in_train_share", 0.1))
        + (("near_in_train", 2.0), ("near_in_train_share", 0.2))
    }
    _write(tmp_path, "data/metrics/corpus.json", json.dumps(corpus))
    _write(tmp_path, "data/metrics/image_audit.json", json.dumps(images))
    text = build_report(tmp_path).markdown()
    assert "| text | test | 490 sentences | 164 removed (verbatim in an earlier split) | 0.0000 left |" in text
    assert "| text | test | 13-grams with a word | | 0.0041 |" in text
    assert "| images | test | 10 images | 2 near | 0.2000 |" in text and "scene digits" not in text
