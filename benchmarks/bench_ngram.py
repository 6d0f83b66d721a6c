"""Throughput and peak memory of the n-gram pipeline (count -> Kneser-Ney -> ARPA), against NLTK.

    .venv/bin/python benchmarks/bench_ngram.py [--tokens 10000000] [--order 5]
        [--out benchmarks/results/ngram.json] [--skip-nltk]

Corpus: the natural text of this Python installation, i.e. the .py, .rst and .txt files of the standard
library (then of the venv's site-packages while more tokens are needed), in sorted path order, read as
UTF-8 with undecodable bytes dropped, tokenised with models/text/tokenizer.py (vocabulary min_count 2 over the
text used) and cut at the last sentence boundary within the first --tokens stream tokens. Tokenisation is
not timed.

The timed work runs in a fresh (spawned) process so its ru_maxrss is the peak of that work alone, plus the
interpreter, numpy/pandas/pyarrow and the token stream it receives (reported as baseline_rss).

Goal: 10M tokens, order 5, under 60 s and under 4 GB peak on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import random
import resource
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.text.ngram import NgramConfig, arpa_chunks, count_ngrams, estimate_kneser_ney  # noqa: E402
from models.text.tokenizer import BOS_ID, EOS_ID, build_vocab, encode, tokenize_document  # noqa: E402

SUFFIXES = (".py", ".rst", ".txt")
NLTK_TOKENS = 100_000
NLTK_SCORE_BUDGET_S = 60.0  # NLTK scores one occurrence per call; past this we extrapolate (see JSON)


def corpus_files() -> list[Path]:
    """Standard library text first, then the venv's site-packages, each in sorted path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])

    def texts(root: Path, skip_site: bool) -> list[Path]:
        return sorted(
            p
            for p in root.rglob("*")
            if p.suffix in SUFFIXES
            and p.is_file()
            and not (skip_site and ({"site-packages", "dist-packages"} & set(p.relative_to(root).parts)))
        )

    return texts(stdlib, skip_site=True) + texts(site, skip_site=False)


def build_corpus(tokens: int) -> tuple[np.ndarray, list[str], dict]:
    """The token stream (int32), its vocabulary and where the text came from."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sentences: list[list[str]] = []
    total, files, from_site = 0, 0, 0
    for path in corpus_files():
        if total >= tokens:
            break
        text = path.read_text(encoding="utf-8", errors="ignore")
        for sentence in tokenize_document(text):
            sentences.append(sentence)
            total += len(sentence) + 2  # <s> and </s>
        files += 1
        from_site += stdlib not in path.parents
    # Cut at the last sentence boundary within the first `tokens` stream tokens.
    lengths = np.cumsum([len(s) + 2 for s in sentences])
    sentences = sentences[: int(np.searchsorted(lengths, tokens, side="right"))]
    vocab = build_vocab(sentences, min_count=2)
    stream = encode(sentences, vocab)
    source = {"files_read": files, "files_from_site_packages": from_site, "stdlib": str(stdlib)}
    return stream, vocab, source


def timed_work(stream: np.ndarray, vocab: list[str], order: int, arpa_dir: str, queue: mp.Queue) -> None:
    """Runs in a spawned child: count, estimate, write the ARPA; report times and the child's peak RSS."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    counts = count_ngrams(stream, len(vocab), order)
    t1 = time.perf_counter()
    kn = estimate_kneser_ney(counts, NgramConfig(order=order))
    t2 = time.perf_counter()
    path = Path(arpa_dir) / "model.arpa"
    with open(path, "wb") as f:
        for chunk in arpa_chunks(kn.model, vocab):
            f.write(chunk)
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Not part of the total: every lower-order model from the same counts (the pipeline reports them all).
    t4 = time.perf_counter()
    for n in range(1, order):
        estimate_kneser_ney(counts, NgramConfig(order=n))
    t5 = time.perf_counter()
    queue.put(
        {
            "count_s": t1 - t0,
            "estimate_s": t2 - t1,
            "arpa_write_s": t3 - t2,
            "total_s": t3 - t0,
            "peak_rss_bytes": peak,
            "baseline_rss_bytes": baseline,
            "arpa_bytes": path.stat().st_size,
            "ngrams_per_order": [len(k) for k in kn.model.keys],
            "discounts": kn.discounts.round(6).tolist(),
            "warnings": list(kn.warnings),
            "estimate_lower_orders_1_to_n_minus_1_s": t5 - t4,
        }
    )


def run_ours(stream: np.ndarray, vocab: list[str], order: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as arpa_dir:
        child = ctx.Process(target=timed_work, args=(stream, vocab, order, arpa_dir, queue))
        child.start()
        while True:  # poll, so a child killed (say for memory) fails the benchmark instead of hanging it
            try:
                result = queue.get(timeout=5)
                break
            except queue_module.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"timed child exited with {child.exitcode} before reporting") from None
        child.join()
    return result


def run_nltk(stream: np.ndarray, vocab: list[str], order: int) -> dict:
    """NLTK's KneserNeyInterpolated fit on the first NLTK_TOKENS stream tokens, then the probability of
    every n-gram occurrence of that slice (one `score` call per predicted token)."""
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline

    piece = stream[:NLTK_TOKENS]
    starts = np.flatnonzero(piece == BOS_ID)
    ends = np.flatnonzero(piece == EOS_ID) + 1
    sentences = [[vocab[i] for i in piece[s + 1 : e - 1]] for s, e in zip(starts, ends)]  # drops a cut last sentence
    used_tokens = int(sum(len(s) + 2 for s in sentences))

    t0 = time.perf_counter()
    lm = KneserNeyInterpolated(order)
    train, words = padded_everygram_pipeline(order, sentences)
    lm.fit(train, words)
    fit_s = time.perf_counter() - t0

    # Each occurrence: a word given its (order-1)-word padded history, exactly NLTK's own padding. Visited
    # in a seeded random order, so a time-limited run still samples every part of the slice.
    occurrences = []
    for s in sentences:
        padded = ["<s>"] * (order - 1) + s + ["</s>"]
        occurrences += [(padded[i], tuple(padded[i - order + 1 : i])) for i in range(order - 1, len(padded))]
    random.Random(0).shuffle(occurrences)
    t1 = time.perf_counter()
    scored = 0
    for word, context in occurrences:
        lm.score(word, context)
        scored += 1
        if time.perf_counter() - t1 > NLTK_SCORE_BUDGET_S:
            break
    score_measured_s = time.perf_counter() - t1
    score_s = score_measured_s * len(occurrences) / scored
    total_s = fit_s + score_s
    return {
        "slice_tokens": used_tokens,
        "fit_s": fit_s,
        "score_occurrences": len(occurrences),
        "score_occurrences_timed": scored,
        "score_measured_s": score_measured_s,
        "score_s": score_s,
        "score_extrapolated": scored < len(occurrences),
        "total_s": total_s,
        "tokens_per_s": used_tokens / total_s,
        "fit_only_tokens_per_s": used_tokens / fit_s,
        "work": (
            "fit (everygram counting) plus one lm.score(word, context) per n-gram occurrence in the slice: "
            "the probability of every counted n-gram, the work our estimation does. NLTK's "
            "KneserNeyInterpolated uses one absolute discount (0.1), not modified KN, and recomputes "
            "continuation counts by scanning all higher-order contexts on every call, so scoring is timed "
            f"for at most {NLTK_SCORE_BUDGET_S:.0f} s and extrapolated linearly to all occurrences when it "
            "runs longer (score_extrapolated)."
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ngram.json")
    parser.add_argument("--skip-nltk", action="store_true", help="only time our implementation")
    args = parser.parse_args()

    t = time.perf_counter()
    stream, vocab, source = build_corpus(args.tokens)
    tokenize_s = time.perf_counter() - t
    n_tokens, n_sentences = len(stream), int((stream == BOS_ID).sum())
    print(f"corpus: {n_tokens} tokens, {n_sentences} sentences, vocab {len(vocab)} ({tokenize_s:.1f} s)")

    ours = run_ours(stream, vocab, args.order)
    ours["tokens_per_s"] = n_tokens / ours["total_s"]
    print(
        f"ours: count {ours['count_s']:.2f} s, estimate {ours['estimate_s']:.2f} s, "
        f"ARPA {ours['arpa_write_s']:.2f} s, total {ours['total_s']:.2f} s, "
        f"{ours['tokens_per_s']:.0f} tokens/s, "
        f"peak {ours['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    result = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": {
            "nproc": os.cpu_count(),
            "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": __import__("pyarrow").__version__,
            "platform": platform.platform(),
        },
        "corpus": {
            "requested_tokens": args.tokens,
            "tokens": n_tokens,
            "predicted_tokens": n_tokens - n_sentences,
            "sentences": n_sentences,
            "vocab_size": len(vocab),
            "tokenize_s_untimed": tokenize_s,
            **source,
        },
        "order": args.order,
        "ours": ours,
        "goal": {"tokens": 10_000_000, "order": 5, "max_total_s": 60, "max_peak_bytes": 4 * 2**30},
    }
    result["goal"]["met"] = bool(
        n_tokens >= 0.99 * 10_000_000
        and args.order >= 5
        and ours["total_s"] < 60
        and ours["peak_rss_bytes"] < 4 * 2**30
    )
    if not args.skip_nltk:
        nltk = run_nltk(stream, vocab, args.order)
        result["nltk"] = nltk
        result["speedup_tokens_per_s_ours_over_nltk"] = ours["tokens_per_s"] / nltk["tokens_per_s"]
        # NLTK's fit alone only counts; ours also estimates and writes the ARPA, so this understates us.
        result["speedup_ours_total_over_nltk_fit_only"] = ours["tokens_per_s"] / nltk["fit_only_tokens_per_s"]
        print(
            f"nltk: fit {nltk['fit_s']:.2f} s, score {nltk['score_s']:.1f} s"
            f"{' (extrapolated)' if nltk['score_extrapolated'] else ''}, "
            f"{nltk['tokens_per_s']:.0f} tokens/s; "
            f"ours/nltk {result['speedup_tokens_per_s_ours_over_nltk']:.0f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
