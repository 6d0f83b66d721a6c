"""Training throughput of the four neural LMs at the committed (default-profile) size.

Each model trains `--steps` optimizer steps on random windows of the built-in corpus's size class
(batch and context from params/lm.yaml), after `--warmup` untimed steps, in its own process so that its
peak RSS is its own. Reports tokens/s (forward + backward + AdamW step) and peak memory.

    .venv/bin/python benchmarks/bench_lm.py --out benchmarks/results/lm.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)


def lm_training_step(name: str, vocab_size: int, after_step: Callable[[], None] | None = None):
    """One optimizer step of LM `name` at the committed size on fixed random tokens: (step, tokens per
    step, model). `after_step` runs after each step (bench_threads.py looks at the load there)."""
    import torch

    from flows.registry import section_config
    from models.text.language_models import build_language_model
    from tasks.text.lm import lm_loss
    from tasks.training import make_optimizer

    params = ROOT / "params"
    cfg = section_config(params, name, vocab_size=vocab_size)
    train = section_config(params, "lm_train")
    torch.manual_seed(0)
    model = build_language_model(name, cfg)
    optimizer = make_optimizer(model, train)
    x = torch.randint(3, vocab_size, (train.batch_size, cfg.context_length))
    y = torch.randint(3, vocab_size, (train.batch_size, cfg.context_length))

    def step() -> None:
        loss = lm_loss(model, (x, y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()

    return step, train.batch_size * cfg.context_length, model


def measure(name: str, steps: int, warmup: int, vocab_size: int, queue: mp.Queue) -> None:
    import torch

    from flows.registry import section_config

    cfg = section_config(ROOT / "params", name, vocab_size=vocab_size)
    train = section_config(ROOT / "params", "lm_train")
    step, tokens, model = lm_training_step(name, vocab_size)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    queue.put(
        {
            "model": name,
            "tokens_per_s": steps * tokens / seconds,
            "ms_per_step": 1000 * seconds / steps,
            "batch_size": train.batch_size,
            "context_length": cfg.context_length,
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=2335, help="the built-in corpus's vocabulary size")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm.json")
    args = parser.parse_args()
    from models.text.language_models import LANGUAGE_MODELS

    results = []
    context = mp.get_context("spawn")
    for name in LANGUAGE_MODELS:
        queue = context.Queue()
        proc = context.Process(target=measure, args=(name, args.steps, args.warmup, args.vocab_size, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        print(json.dumps(results[-1]))
    out = {
        "command": f"python benchmarks/bench_lm.py --steps {args.steps} --warmup {args.warmup}",
        "what": "training tokens/s (forward + backward + AdamW) at the default-profile size, random tokens",
        "results": results,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
