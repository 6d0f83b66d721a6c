"""`kiln run` asks DVC for every stage's status once, when it starts, and asks again only for a stage
something upstream of which ran in this run (flows/pipeline.py: `_known_reasons`)."""

from __future__ import annotations

from flows.pipeline import StageOutcome, _known_reasons

UPSTREAM = {"corpus": [], "ngram": ["corpus"], "lm": ["corpus"], "report": ["ngram", "lm"]}
OPENING = {"corpus": [], "ngram": ["params params/lm.yaml: ngram.order 3 -> 2"], "lm": [], "report": []}


def outcomes(**status: str) -> dict[str, StageOutcome]:
    return {name: StageOutcome(name, s) for name, s in status.items()}  # type: ignore[arg-type]


def test_nothing_upstream_ran_the_opening_status_stands():
    done = outcomes(corpus="up to date")
    assert _known_reasons("corpus", UPSTREAM, {}, OPENING) == []
    assert _known_reasons("lm", UPSTREAM, done, OPENING) == []  # up to date, without asking DVC
    assert _known_reasons("ngram", UPSTREAM, done, OPENING) == OPENING["ngram"]  # stale, and why


def test_a_stage_whose_upstream_ran_is_asked_again():
    # ngram ran, so its outputs may have changed: report's opening "up to date" no longer holds.
    done = outcomes(corpus="up to date", ngram="ran", lm="up to date")
    assert _known_reasons("report", UPSTREAM, done, OPENING) is None
    # corpus ran: both its dependents are asked again.
    done = outcomes(corpus="ran")
    assert _known_reasons("lm", UPSTREAM, done, OPENING) is None
    assert _known_reasons("ngram", UPSTREAM, done, OPENING) is None


def test_without_an_opening_status_every_stage_is_asked():
    # --force takes no opening status; nor does a stage the opening did not cover.
    assert _known_reasons("corpus", UPSTREAM, {}, {}) is None
    assert _known_reasons("lm", UPSTREAM, outcomes(corpus="up to date"), {"corpus": []}) is None
