"""`kiln summary`: the headline figures, read from the stages' metrics files."""


def test_summary_reads_the_metrics_files(tmp_path):
    from tasks.summary import headline

    assert headline(tmp_path) == "no metrics yet: run `kiln run`"
    (tmp_path / "data/plots").mkdir(parents=True)
    (tmp_path / "data/plots/lm_compare.csv").write_text("model,family,test_perplexity\nunigram,ngram,104.4\nlstm,neural,16.8\n")
    (tmp_path / "data/metrics").mkdir(parents=True)
    (tmp_path / "data/metrics/map.json").write_text('{"thundernet": {"AP": 0.5, "AP50": 0.6, "AP75": 0.55, "AR100": 0.7}}')
    text = headline(tmp_path)
    assert "unigram        104.40" in text and text.index("unigram") < text.index("lstm")
    assert "thundernet    0.500  0.600  0.550  0.700          nan" in text
