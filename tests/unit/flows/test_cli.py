"""The `kiln` CLI's own behaviour: unknown names rejected at once with a "did you mean", --help listing
the stages and profiles, `kiln run --dry-run` running nothing."""

from __future__ import annotations

import pytest

from flows.cli import main


@pytest.fixture
def at_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--target", "ngarm"], "kiln run: error: no stage 'ngarm'; did you mean 'ngram'?"),
        (["stage", "lm@lsmt"], "kiln stage: error: no stage 'lm@lsmt'; did you mean 'lm@lstm'?"),
        (["run", "--family", "txt"], "kiln run: error: no family 'txt'; did you mean 'text'? (families: "),
        (["status", "--target", "diffusion@ddmp"], "did you mean 'diffusion@ddpm'?"),
    ],
)
def test_unknown_names_are_one_line_with_a_suggestion(at_root, capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1  # once, one line, no traceback


def test_help_lists_runnable_stages_and_profiles(at_root, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "lm@mamba" in out and "diffusion@dit_rf" in out and "detector@one_stage" in out
    assert "profiles (kiln profile NAME): default, gpu, smoke" in out


def test_dry_run_runs_nothing_and_says_why(at_root, capsys, repo_root):
    before = sorted(p.name for p in (repo_root / "data").glob("*")) if (repo_root / "data").exists() else []
    assert main(["run", "--target", "ngram", "--dry-run", "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["would run  corpus  (--force)", "would run  ngram  (--force)"]
    assert out[-1] == "kiln run --dry-run: 2 of 2 stages would run; nothing was run."
    after = sorted(p.name for p in (repo_root / "data").glob("*")) if (repo_root / "data").exists() else []
    assert after == before


@pytest.mark.parametrize("command", [["status"], ["run", "--dry-run"]])
def test_a_yaml_bomb_in_params_is_one_error_line_before_dvc_reads_it(tmp_path, monkeypatch, capsys, command):
    import shutil

    project = tmp_path / "repo"
    shutil.copytree(pytest.importorskip("tests.conftest").REPO / "params", project / "params")
    (project / "dvc.yaml").write_text("stages: {}\n")
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    (project / "params" / "lm.yaml").write_text(bomb)
    monkeypatch.chdir(project)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "params/lm.yaml: <file>: too many YAML alias expansions" in err and err.count("\n") == 1


def test_debug_shows_the_traceback_of_an_input_error(at_root):
    from flows.registry import UnknownStage

    with pytest.raises(UnknownStage, match="did you mean 'ngram'"):
        main(["--debug", "stage", "ngarm"])


def test_the_sigterm_deadline_counts_from_the_signal_even_while_another_handler_holds_it(repo_root):
    """Inside a flow run Prefect's SIGTERM handler runs first and unwinds for seconds before `_terminate` sees
    the signal. Here a handler that never returns stands in for it: the process still exits with 128 + 15 at
    `TERM_EXIT_AFTER_S` after the signal, not later and not sooner."""
    import signal
    import subprocess
    import sys
    import time

    from flows.cli import TERM_EXIT_AFTER_S

    code = (
        "import signal, time\n"
        "from flows.cli import _watch_for_sigterm\n"
        "import tasks.tracking\n"  # imported here as in a run, so the deadline does not pay for it
        "_watch_for_sigterm()\n"
        "signal.signal(signal.SIGTERM, lambda *a: time.sleep(120))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        elapsed = time.monotonic() - start
    finally:
        process.kill()
        process.wait()
    assert TERM_EXIT_AFTER_S - 0.2 < elapsed < TERM_EXIT_AFTER_S + 2.0
