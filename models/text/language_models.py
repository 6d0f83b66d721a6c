"""The neural language models of Kiln behind one interface: a registry, a builder, one sampler, one NLL.

Every model maps token ids idx (B, T) to next-token logits (B, T, V) and has a config dataclass with
`vocab_size` and `context_length`; its fields are the model's section of params/lm.yaml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.text.lstm import LSTMLM, LSTMConfig
from models.text.mamba import MambaConfig, MambaLM
from models.text.s4d import S4DLM, S4DConfig
from models.text.transformer import TransformerConfig, TransformerLM

LANGUAGE_MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "transformer": (TransformerConfig, TransformerLM),
    "s4d": (S4DConfig, S4DLM),
    "mamba": (MambaConfig, MambaLM),
    "lstm": (LSTMConfig, LSTMLM),
}


def build_language_model(name: str, config: Any) -> nn.Module:
    """The model `name` built from its config dataclass, or from a mapping of its fields (strict: an unknown
    or missing field is a ValueError naming it)."""
    if name not in LANGUAGE_MODELS:
        raise ValueError(f"unknown language model {name!r}; choose from {sorted(LANGUAGE_MODELS)}")
    config_cls, model_cls = LANGUAGE_MODELS[name]
    if isinstance(config, Mapping):
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown {name} config field(s): {', '.join(unknown)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(config_cls)
            if f.name not in config and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"missing {name} config field(s): {', '.join(missing)}")
        config = config_cls(**config)
    if not isinstance(config, config_cls):
        raise TypeError(f"{name} needs a {config_cls.__name__}, got {type(config).__name__}")
    return model_cls(config)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Autoregressive sampling: prompt (B, T) or (T,) -> prompt plus `max_new_tokens` tokens, same rank.

    Each step re-runs the full forward on the last `context_length` tokens and samples from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens. temperature == 0 is greedy.
    Quadratic in the output length, which is fine for the short samples a report shows; the recurrent
    models also have `step` for linear-time generation.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    squeeze = prompt_ids.dim() == 1
    idx = prompt_ids[None] if squeeze else prompt_ids  # (B, T)
    if idx.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token")
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.cfg.context_length :])[:, -1].float()  # (B, V) next-token logits
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) k-th largest
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
    finally:
        model.train(was_training)
    return idx[0] if squeeze else idx


def sequence_nll(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> tuple[Tensor, int]:
    """Summed natural-log negative log-likelihood of `targets` (B, T) under `logits` (B, T, V), and the number
    of tokens summed. `mask` (B, T), true where a target counts. Perplexity over a stream is
    exp(sum of nll / sum of counts); the sum is in float32 or wider, whatever the logits' dtype."""
    flat = logits.flatten(0, -2)  # (B*T, V)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # half-precision sums of thousands of terms lose digits
    nll = F.cross_entropy(flat, targets.flatten(), reduction="none")  # (B*T,)
    if mask is None:
        return nll.sum(), nll.numel()
    mask = mask.flatten().to(torch.bool)
    return nll[mask].sum(), int(mask.sum())
