"""LSTM language model baseline (Hochreiter & Schmidhuber 1997; the regularised word-level LM of Zaremba et
al. 2014), through `torch.nn.LSTM`, with the embedding and head pattern of the other Kiln LMs.

Weight tying (Press & Wolf 2017; Inan et al. 2017) needs the last hidden state in the embedding space: when
d_hidden != d_embed a linear projection maps it there first (as AWD-LSTM does by shrinking its last layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LSTMConfig:
    vocab_size: int
    context_length: int = 256  # training window (truncated BPTT length); the model accepts any length
    d_embed: int = 128
    d_hidden: int = 256
    n_layer: int = 2
    dropout: float = 0.2  # on embeddings, between LSTM layers and on the output
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_embed", "d_hidden", "n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LSTMLM(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.d_embed, cfg.d_hidden, cfg.n_layer, batch_first=True, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0
        )
        tie_through_projection = cfg.tie_weights and cfg.d_hidden != cfg.d_embed
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_embed) if tie_through_projection else None
        self.lm_head = nn.Linear(cfg.d_embed if cfg.tie_weights else cfg.d_hidden, cfg.vocab_size, bias=True)
        # Zaremba et al. draw every weight from U(-0.1, 0.1); nn.LSTM's default U(+-1/sqrt(d_hidden)) is close,
        # the embedding (and so the tied head) gets their interval
        nn.init.uniform_(self.tok_emb.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def _head(self, out: Tensor) -> Tensor:
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)  # (..., d_embed)
        return self.lm_head(out)  # (..., V)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.drop(self.tok_emb(idx))  # (B, T, d_embed)
        if torch.is_autocast_enabled("cpu"):
            # oneDNN has no bf16 LSTM kernel on CPUs without AVX512-BF16 ("could not create a primitive
            # descriptor"), so under CPU autocast the recurrence runs in float32; the head stays in bf16.
            with torch.autocast("cpu", enabled=False):
                out, _ = self.lstm(x.float())  # (B, T, d_hidden)
        else:
            out, _ = self.lstm(x)  # (B, T, d_hidden)
        return self._head(out)  # (B, T, V)

    def init_state(self, batch_size: int, device=None) -> tuple[Tensor, Tensor]:
        shape = (self.cfg.n_layer, batch_size, self.cfg.d_hidden)
        dtype = self.tok_emb.weight.dtype
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def step(self, idx_t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Recurrent inference: token ids (B,) -> logits (B, V) and the new (h, c), each (n_layer, B, d_hidden)."""
        out, state = self.lstm(self.drop(self.tok_emb(idx_t))[:, None], state)  # (B, 1, d_hidden)
        return self._head(out[:, 0]), state
