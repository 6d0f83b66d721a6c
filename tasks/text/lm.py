"""Neural language model tasks: `lm@{lstm,transformer,s4d,mamba}` (train, evaluate, sample) and
`lm_compare` (every model's test perplexity beside the Kneser-Ney orders).

Perplexity follows the project's one accounting (README): the test stream of the `corpus` stage, every
token but `<s>` predicted and counted. It is scored two ways:

- `test_perplexity`, the headline: every sentence on its own, its context starting at its `<s>`
  (`sentence_nll`), the information the Kneser-Ney model has, so the two are compared like for like;
- `test_perplexity_stream`: sliding windows over the continuous stream (`stream_nll`), whose context crosses
  sentence boundaries. `val_perplexity` (during training) and `val_perplexity_final` are scored this way too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.text.language_models import (
    LANGUAGE_MODELS,
    build_language_model,
    sample,
    sequence_nll,
)
from models.text.tokenizer import BOS_ID, EOS_ID, sentence_bounds
from tasks.io import atomic_path, write_json
from tasks.layout import CORPUS_DIR, LM_DIR, METRICS_DIR, PLOTS_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec, replicated
from tasks.text.corpus import read_stream, read_vocab, vocab_digest
from tasks.tracking import StageRun
from tasks.training import (
    TrainConfig,
    TrainResult,
    load_model,
    load_model_with_meta,
    resolve_device,
    save_model,
    train,
)

LM_NAMES = tuple(LANGUAGE_MODELS)


@dataclass(frozen=True)
class LMEvalConfig:
    """`params/lm.yaml: lm_eval`: how the neural LMs are evaluated and sampled."""

    batch_size: int  # evaluation windows per forward pass
    val_max_tokens: int  # tokens of the val stream scored at each mid-training evaluation; 0: all
    sample_tokens: int  # length of the text sample logged to MLflow
    sample_temperature: float
    sample_top_k: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.val_max_tokens < 0 or self.sample_tokens < 0:
            raise ValueError("val_max_tokens and sample_tokens must be >= 0")
        if self.sample_temperature < 0 or self.sample_top_k < 1:
            raise ValueError("sample_temperature must be >= 0 and sample_top_k >= 1")


# ----------------------------------------------------------------------------------- compute


def token_log_probs(
    model: nn.Module, stream: np.ndarray, context: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Natural-log p(stream[i + 1] | stream[..i]) for every i, as a (len - 1,) float64 array.

    Sliding windows of `context` tokens with stride `context // 2`: after the first window only each
    window's second half is kept, so every token is scored once, with at least half a window of history.
    """
    ids = torch.as_tensor(stream, dtype=torch.long)
    n = len(ids) - 1  # positions with a next token
    out = np.zeros(n, dtype=np.float64)
    stride = max(1, context // 2)
    starts = list(range(0, max(1, n - context + stride), stride))
    for lo in range(0, len(starts), batch_size):
        rows = starts[lo : lo + batch_size]
        width = max(min(context, n - s) for s in rows)
        x = torch.full((len(rows), width), EOS_ID, dtype=torch.long)  # right padding, never scored
        for r, s in enumerate(rows):
            x[r, : min(context, n - s)] = ids[s : s + min(context, n - s)]
        logp = torch.log_softmax(model(x.to(device)).float(), dim=-1).cpu()  # (B, T, V)
        for r, s in enumerate(rows):
            length = min(context, n - s)
            first = 0 if s == 0 else context - stride  # earlier positions were kept from the previous window
            if first >= length:
                continue
            targets = ids[s + 1 + first : s + 1 + length]
            out[s + first : s + length] = logp[r, first:length].gather(-1, targets[:, None])[:, 0].double().numpy()
    return out


def stream_nll(
    model: nn.Module, stream: np.ndarray, context: int, batch_size: int, device: torch.device
) -> tuple[float, int]:
    """Summed natural-log NLL of a token stream and the number of tokens counted: every target but `<s>`
    (the project's accounting)."""
    counted = np.asarray(stream[1:]) != BOS_ID
    return float(-token_log_probs(model, stream, context, batch_size, device)[counted].sum()), int(counted.sum())


@in_phase("evaluation")
def perplexity(model: nn.Module, stream: np.ndarray, context: int, batch_size: int, device: torch.device) -> float:
    nll, count = stream_nll(model, stream, context, batch_size, device)
    return math.exp(nll / count)


def _sentences(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start (`<s>`) and end (one past `</s>`) of every sentence of a stream that is nothing but sentences."""
    starts, ends = sentence_bounds(np.asarray(stream))
    if len(starts) == 0 or starts[0] != 0 or ends[-1] != len(stream) or np.any(starts[1:] != ends[:-1]):
        raise ValueError("token stream is not a sequence of <s> ... </s> sentences")
    return starts, ends


def _windows(n: int, context: int) -> list[tuple[int, int, int]]:
    """(start, length, first kept position) of the sliding windows that score the `n` next-token positions of
    a sequence, as `token_log_probs` places them: stride `context // 2`, each position scored once."""
    stride = max(1, context // 2)
    out = []
    for s in range(0, max(1, n - context + stride), stride):
        length, first = min(context, n - s), 0 if s == 0 else context - stride
        if first < length:
            out.append((s, length, first))
    return out


def sentence_nll(
    model: nn.Module, stream: np.ndarray, context: int, batch_size: int, device: torch.device
) -> tuple[float, int]:
    """Summed natural-log NLL of a stream of `<s> ... </s>` sentences with every sentence scored on its own,
    its context starting at its `<s>` (as the Kneser-Ney model scores it), and the number of tokens counted:
    every token after a `<s>`, `</s>` included (the same tokens as `stream_nll`).

    A sentence longer than `context` is scored with the sliding windows of `token_log_probs` inside it. The
    windows of all sentences are sorted by length and batched with right padding and a mask, each forward
    holding about as many tokens as `batch_size` full windows. `sentence_nll_ref` is the slow twin.
    """
    ids = torch.as_tensor(np.asarray(stream), dtype=torch.long)
    starts, ends = _sentences(stream)
    windows = [
        (int(a) + s, length, first)  # (offset in the stream, inputs, first counted position)
        for a, b in zip(starts, ends)
        for s, length, first in _windows(int(b - a) - 1, context)
    ]
    windows.sort(key=lambda w: -w[1])  # similar lengths together; the widest of a batch comes first
    budget = batch_size * context
    total, count, i = 0.0, 0, 0
    with torch.no_grad():
        while i < len(windows):
            width = windows[i][1]
            rows = windows[i : i + max(1, budget // width)]
            x = torch.full((len(rows), width), EOS_ID, dtype=torch.long)  # right padding, masked out
            y = torch.full((len(rows), width), EOS_ID, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, (offset, length, first) in enumerate(rows):
                x[r, :length] = ids[offset : offset + length]
                y[r, :length] = ids[offset + 1 : offset + 1 + length]
                mask[r, first:length] = True
            nll, n = sequence_nll(model(x.to(device)), y.to(device), mask.to(device))
            total += float(nll)
            count += n
            i += len(rows)
    return total, count


def sentence_nll_ref(model: nn.Module, stream: np.ndarray, context: int, device: torch.device) -> tuple[float, int]:
    """`sentence_nll` one sentence at a time, no padding: `token_log_probs` of each `<s> ... </s>` alone."""
    starts, ends = _sentences(stream)
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in zip(starts, ends):
            logp = token_log_probs(model, np.asarray(stream[a:b]), context, 1, device)
            total -= float(logp.sum())
            count += len(logp)
    return total, count


@in_phase("evaluation")
def sentence_perplexity(
    model: nn.Module, stream: np.ndarray, context: int, batch_size: int, device: torch.device
) -> float:
    nll, count = sentence_nll(model, stream, context, batch_size, device)
    return math.exp(nll / count)


def random_windows(stream: Tensor, context: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of random (input, target) windows of the train stream."""
    starts = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context + 1)
    windows = stream[starts[:, None] + offsets]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    nll, count = sequence_nll(model(x), y, y != BOS_ID)
    return nll / count


@dataclass
class LMFit:
    model: nn.Module
    train: TrainResult
    test_perplexity: float  # every test sentence on its own, context from its <s> (like for like with the n-gram)
    test_perplexity_stream: float  # sliding windows over the continuous test stream, across sentences
    val_perplexity: float  # stream context, as during training
    parameters: int
    sample: str

    def results(self) -> dict[str, float]:
        """What the model reached: deterministic for a seed, so DVC sees no change when nothing changed."""
        return {
            "test_perplexity": self.test_perplexity,
            "test_perplexity_stream": self.test_perplexity_stream,
            "val_perplexity_final": self.val_perplexity,
            "parameters": float(self.parameters),
        }

    def metrics(self) -> dict[str, float]:
        """Everything for MLflow: the results and how the run went (time, throughput, resume point)."""
        return {
            **self.results(),
            "train_seconds": self.train.train_seconds,
            "train_tokens_per_s": self.train.items_per_second,
            "resumed_from_step": float(self.train.resumed_from),
        }


def fit_language_model(
    name: str,
    model_cfg: Any,
    train_cfg: TrainConfig,
    eval_cfg: LMEvalConfig,
    streams: dict[str, np.ndarray],
    vocab: list[str],
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
) -> LMFit:
    context = model_cfg.context_length
    for split, stream in streams.items():
        if len(stream) < context + 2:
            raise ValueError(
                f"{name}.context_length = {context} is longer than the {split} stream "
                f"({len(stream)} tokens); lower it or give more text"
            )
    torch.manual_seed(seed)
    model = build_language_model(name, model_cfg)
    train_stream = torch.as_tensor(streams["train"], dtype=torch.long)
    val = streams["val"] if not eval_cfg.val_max_tokens else streams["val"][: eval_cfg.val_max_tokens]

    def next_batch(generator: torch.Generator):
        x, y = random_windows(train_stream, context, train_cfg.batch_size, generator)
        return x.to(device), y.to(device)

    fingerprint = {
        "model": name,
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "seed": seed,
        "train_tokens": int(len(streams["train"])),
        "train_checksum": int(np.sum(streams["train"], dtype=np.int64)),
        "vocab_size": len(vocab),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=lm_loss,
        evaluate=lambda m: {"val_perplexity": perplexity(m, val, context, eval_cfg.batch_size, device)},
        items_per_batch=train_cfg.batch_size * context,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        desc=f"lm@{name}",
    )
    model.eval()
    with torch.no_grad():
        test_ppl = sentence_perplexity(model, streams["test"], context, eval_cfg.batch_size, device)
        test_stream_ppl = perplexity(model, streams["test"], context, eval_cfg.batch_size, device)
        val_ppl = perplexity(model, streams["val"], context, eval_cfg.batch_size, device)
    text = sample_text(model, vocab, eval_cfg, seed, device)
    parameters = sum(p.numel() for p in model.parameters())
    return LMFit(model, result, test_ppl, test_stream_ppl, val_ppl, parameters, text)


@in_phase("sampling")
def sample_text(model: nn.Module, vocab: list[str], cfg: LMEvalConfig, seed: int, device: torch.device) -> str:
    """A sample from `<s>` (temperature and top-k), one line per generated sentence."""
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor([BOS_ID], device=device)
    ids = sample(model, prompt, cfg.sample_tokens, cfg.sample_temperature, cfg.sample_top_k, generator)
    words = [vocab[i] for i in ids.tolist()]
    return " ".join(words).replace(" </s> <s> ", " </s>\n<s> ")


def load_language_model(path: Path, device: torch.device | str = "cpu") -> tuple[str, nn.Module]:
    return load_model(path, build_language_model, device)


def load_language_model_with_meta(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[str, nn.Module, dict[str, str]]:
    """The model and what it recorded at training: `vocab_digest`, the corpus vocabulary it was trained on."""
    return load_model_with_meta(path, build_language_model, device)


# -------------------------------------------------------------------------------------- tasks


def derived_model_fields(name: str) -> Callable[[Path], dict[str, dict[str, Any]]]:
    """What `open_stage` fills into the model's config from the data: the corpus vocabulary size."""
    return lambda root: {name: {"vocab_size": len(read_vocab(root / CORPUS_DIR))}}


@dataclass(frozen=True)
class LMInputs:
    model: Any  # the item's section (`lstm`, ...), typed by LANGUAGE_MODELS
    lm_train: TrainConfig
    lm_eval: LMEvalConfig


@task(name="lm", cache_policy=NO_CACHE)
def lm_task(ctx: StageContext, inputs: LMInputs) -> dict[str, float]:
    root, name, run, seed, device_name = ctx.root, ctx.item, ctx.run, ctx.seed, ctx.device
    model_cfg, train_cfg, eval_cfg = inputs.model, inputs.lm_train, inputs.lm_eval
    instance = ctx.instance  # where the outputs go: `lstm`, or `lstm-2` for a replicate
    corpus_dir, out_dir = root / CORPUS_DIR, root / LM_DIR / instance
    vocab = read_vocab(corpus_dir)
    streams = {split: read_stream(corpus_dir, split) for split in ("train", "val", "test")}
    for split in ("train", "test"):
        run.log_input(
            pd.DataFrame({"token_id": streams[split]}),
            source=str(corpus_dir / f"{split}.parquet"),
            name=f"corpus-{split}",
            context=split,
        )
    device = resolve_device(device_name)
    fit = fit_language_model(
        name,
        model_cfg,
        train_cfg,
        eval_cfg,
        streams,
        vocab,
        seed=seed,
        device=device,
        checkpoint=out_dir / "checkpoint.pt",
        run=run,
    )
    save_model(out_dir / "model.pt", name, model_cfg, fit.model, meta={"vocab_digest": vocab_digest(vocab)})

    metrics = fit.metrics()
    write_json(root / METRICS_DIR / "lm" / f"{instance}.json", fit.results())
    curve = pd.DataFrame(fit.train.history)
    with atomic_path(root / PLOTS_DIR / "lm" / f"{instance}.csv") as tmp:
        curve.to_csv(tmp, index=False)
    run.log_metrics(metrics)
    run.log_text(fit.sample + "\n", "sample.txt")
    run.log_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n", "model_config.json")
    run.log_artifact(root / PLOTS_DIR / "lm" / f"{instance}.csv", "plots")
    print(
        f"{instance} (seed {seed}): test perplexity {fit.test_perplexity:.2f} (context from each sentence's <s>), "
        f"{fit.test_perplexity_stream:.2f} (stream context) ({fit.parameters:,} parameters, "
        f"{fit.train.items_per_second:,.0f} tokens/s)\nsample: {fit.sample[:300]}"
    )
    return metrics


SPEC = StageSpec(
    name="lm",
    family="text",
    task=lm_task,
    inputs=LMInputs,
    items=LM_NAMES,
    sections=lambda item: {"model": (item, LANGUAGE_MODELS[item][0])},
    derive=lambda root, item: derived_model_fields(item)(root),
    placeholders={name: {"vocab_size": 1} for name in LM_NAMES},
)
# The same training with seeds runtime.seed + r, r from `replicates.lm`: `lm_replicate@lstm-1`.
REPLICATE_SPEC = replicated(SPEC, name="lm_replicate", replicates="lm")
SPECS = [SPEC, REPLICATE_SPEC]
