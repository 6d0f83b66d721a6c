"""flows/dvc_graph.py's `critical_path_order`: which ready stage `kiln run` starts first when stages wait for a
slot, on small DAGs with known answers."""

from __future__ import annotations

from flows.dvc_graph import critical_path_order

# a -> b (2 s in all), c -> d (20 s), e alone (5 s); "x -> y": y needs x
ORDER = ["a", "b", "c", "d", "e"]
UPSTREAM = {"a": [], "b": ["a"], "c": [], "d": ["c"], "e": []}
SECONDS = {"a": 1.0, "b": 1.0, "c": 10.0, "d": 10.0, "e": 5.0}


def is_topological(order: list[str], upstream: dict[str, list[str]]) -> bool:
    seen: set[str] = set()
    for name in order:
        if not set(upstream[name]) <= seen:
            return False
        seen.add(name)
    return True


def test_the_stage_that_holds_up_the_most_work_comes_first():
    # paths: c 20, d 10, e 5, a 2, b 1
    assert critical_path_order(ORDER, UPSTREAM, SECONDS) == ["c", "d", "e", "a", "b"]


def test_a_short_stage_before_a_long_chain_outranks_a_longer_stage_alone():
    upstream = {"prep": [], "train": ["prep"], "report": ["train"], "big": []}
    seconds = {"prep": 1.0, "train": 100.0, "report": 1.0, "big": 50.0}
    assert critical_path_order(["big", "prep", "train", "report"], upstream, seconds) == [
        "prep",
        "train",
        "big",
        "report",
    ]


def test_without_seconds_the_dependency_order_is_kept_and_ties_keep_it_too():
    assert critical_path_order(ORDER, UPSTREAM, {}) == ORDER
    assert critical_path_order(ORDER, UPSTREAM, dict.fromkeys(ORDER, 1.0)) == ["a", "c", "b", "d", "e"]


def test_stages_of_unknown_or_zero_seconds_never_precede_what_they_depend_on():
    # chain p -> q -> r where only r has seconds: all three share its path, so order decides
    upstream = {"p": [], "q": ["p"], "r": ["q"], "s": []}
    ranked = critical_path_order(["s", "p", "q", "r"], upstream, {"r": 3.0, "s": 3.0, "q": 0.0})
    assert ranked == ["s", "p", "q", "r"] and is_topological(ranked, upstream)
    assert is_topological(critical_path_order(ORDER, UPSTREAM, SECONDS), UPSTREAM)
