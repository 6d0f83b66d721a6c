"""A small learned text encoder for text-conditioned latent diffusion, as Stable Diffusion conditions its UNet
on text (Rombach et al. 2022, Section 3.3), with a word tokenizer instead of CLIP's BPE and a Transformer
trained from scratch with the denoiser instead of a frozen pretrained one.

    caption -> word ids (vocabulary built from the training captions; <pad> = 0, <unk> = 1), padded to L
    ids -> token embedding + learned position embedding -> TransformerEncoder (pre-norm) -> LayerNorm
        -> (B, L, D) token features and a (B, L) padding mask (True at padding)
    TextConditionedUNet: the UNet's cross-attention reads those tokens (models/generative/unet.py, context_dim = D).

The empty caption is all <pad>: position 0 is never masked, so an empty caption is one attended <pad> token
(a learned "no text" context, the null condition of classifier-free guidance) and no attention row is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.generative.unet import UNet

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class TextEncoderConfig:
    vocab_size: int = 2  # from the tokenizer (the training captions' words + <pad>, <unk>)
    max_length: int = 8  # L: captions are cut or padded to this many tokens
    dim: int = 64  # D: token width (the UNet's context_dim)
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad>, <unk>), got {self.vocab_size}")
        for name in ("max_length", "dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide dim ({self.dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def words(text: str) -> list[str]:
    """Lower-cased words and numbers: "A sketch of a 7." -> ["a", "sketch", "of", "a", "7"]."""
    return re.findall(r"[a-z0-9]+", text.lower())


class WordTokenizer:
    """Whitespace/punctuation word vocabulary: <pad>, <unk>, then the corpus words sorted (deterministic)."""

    def __init__(self, vocab: list[str]) -> None:
        if vocab[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD}, {UNK}; got {vocab[:2]}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: list[str]) -> WordTokenizer:
        return cls([PAD, UNK, *sorted({w for text in texts for w in words(text)})])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, length: int) -> list[int]:
        ids = [self.index.get(w, UNK_ID) for w in words(text)][:length]
        return ids + [PAD_ID] * (length - len(ids))

    def encode_batch(self, texts: list[str], length: int) -> Tensor:
        return torch.tensor([self.encode(t, length) for t in texts], dtype=torch.long)  # (B, L)

    def decode(self, ids: list[int] | Tensor) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != PAD_ID)


# ----------------------------------------------------------------------------------------------------
# Encoder


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_length, D) * 0.02)
        layer = nn.TransformerEncoderLayer(
            D, cfg.num_heads, 4 * D, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # enable_nested_tensor=False: the fast path would drop padded positions' outputs to 0, not compute them
        self.transformer = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, L') long, L' <= max_length -> tokens (B, L', D), mask (B, L') True at padding."""
        if ids.ndim != 2 or ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"expected ids of shape (B, <= {self.cfg.max_length}), got {tuple(ids.shape)}")
        mask = ids == PAD_ID  # (B, L')
        mask[:, 0] = False  # an empty caption is one attended <pad> token (see the module docstring)
        h = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L', D)
        h = self.transformer(h, src_key_padding_mask=mask)  # (B, L', D)
        return self.norm(h), mask


class TextConditionedUNet(nn.Module):
    """The UNet conditioned on a caption: forward(x, t, y) with y (B, L) token ids. `null_label` is the <pad>
    id, so ClassifierFreeGuidance's `full_like(y, null_label)` is the empty caption."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder) -> None:
        super().__init__()
        if unet.cfg.context_dim != text_encoder.cfg.dim:
            raise ValueError(
                f"the UNet's context_dim ({unet.cfg.context_dim}) must equal the text encoder's dim "
                f"({text_encoder.cfg.dim})"
            )
        if unet.cfg.num_classes:
            raise ValueError("a text-conditioned UNet has no label embedding (num_classes must be 0)")
        self.unet = unet
        self.text_encoder = text_encoder

    @property
    def null_label(self) -> int:
        return PAD_ID

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, H, W); t (B,); y (B, L) caption token ids, or None for the empty caption."""
        if y is None:
            y = torch.full((x.shape[0], 1), PAD_ID, dtype=torch.long, device=x.device)
        context, mask = self.text_encoder(y)  # (B, L, D), (B, L)
        return self.unet(x, t, context=context, context_mask=mask)  # (B, C, H, W)


def drop_captions(ids: Tensor, p_uncond: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each whole caption by the empty one with probability p_uncond (classifier-free guidance
    training; the process's drop_labels would drop single tokens of a (B, L) caption)."""
    if p_uncond <= 0:
        return ids
    drop = torch.rand((ids.shape[0], 1), generator=generator, device=ids.device) < p_uncond  # (B, 1)
    return torch.where(drop, torch.full_like(ids, PAD_ID), ids)
