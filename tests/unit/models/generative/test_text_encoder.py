"""models/generative/text_encoder.py and the UNet's cross-attention: tokenizer, encoder masking, zero-init, caption
dependence, classifier-free guidance with the empty caption, and the ldm_text caption templates."""

import hashlib

import pytest
import torch

from models.generative.ddpm import ClassifierFreeGuidance, DiffusionConfig, GaussianDiffusion
from models.generative.text_encoder import (
    PAD_ID,
    UNK_ID,
    TextConditionedUNet,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
    drop_captions,
)
from models.generative.unet import CrossAttentionBlock, UNet, UNetConfig
from tasks.generative.ldm_text import LdmTextConfig, build_tokenizer, caption_ids, captions


def unet_cfg(**kw) -> UNetConfig:
    base = dict(
        in_channels=4,
        image_size=8,
        base_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        num_heads=4,
        dropout=0.0,
        num_groups=8,
    )
    return UNetConfig(**{**base, **kw})


def text_model(seed: int = 0) -> tuple[TextConditionedUNet, WordTokenizer]:
    tok = WordTokenizer.build(["a handwritten seven", "the digit 7", "a handwritten one", "the digit 1"])
    torch.manual_seed(seed)
    enc = TextEncoder(TextEncoderConfig(vocab_size=len(tok), max_length=6, dim=16, num_layers=1, num_heads=4))
    return TextConditionedUNet(UNet(unet_cfg(context_dim=16)), enc), tok


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_tokenizer_round_trip_and_unknown_words():
    tok = WordTokenizer.build(["A handwritten seven.", "the digit 7"])
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and len(tok) == 2 + 6
    ids = tok.encode("the handwritten 7", 5)
    assert ids[3:] == [PAD_ID, PAD_ID] and tok.decode(ids) == "the handwritten 7"
    assert tok.encode("a sketch of 7", 4) == [tok.index["a"], UNK_ID, UNK_ID, tok.index["7"]]
    assert tok.encode("a a a a a a", 3) == [tok.index["a"]] * 3  # cut to the length
    assert tok.encode_batch(["seven", ""], 2).tolist() == [[tok.index["seven"], PAD_ID], [PAD_ID, PAD_ID]]


def test_encoder_shapes_and_padding_is_ignored():
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(vocab_size=10, max_length=6, dim=16, num_layers=2, num_heads=4)).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    tokens, mask = enc(ids)
    assert tokens.shape == (2, 6, 16) and mask.tolist() == [[False] * 3 + [True] * 3, [False] + [True] * 5]
    # a padded position's embedding changes: the unpadded positions' features do not
    with torch.no_grad():
        enc.pos_embed[:, 4] += 1.0
    tokens2, _ = enc(ids)
    assert torch.allclose(tokens2[0, :3], tokens[0, :3], atol=1e-6) and torch.allclose(
        tokens2[1, :1], tokens[1, :1], atol=1e-6
    )
    # an all-pad (empty) caption is one attended token: finite features, no empty attention row
    empty, mask = enc(torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(empty).all() and mask[:, 0].eq(False).all()
    with pytest.raises(ValueError):
        enc(torch.zeros(1, 7, dtype=torch.long))


def test_cross_attention_ignores_masked_context():
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 8, 4, 8)
    perturb(block)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    mask = torch.tensor([[False, False, True, True, True]] * 2)
    out = block(x, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[:, 2:] = torch.randn(2, 3, 8)
    assert torch.allclose(block(x, ctx2, mask), out, atol=1e-6)
    assert not torch.allclose(block(x, ctx2, None), block(x, ctx, None))
    assert torch.equal(block(x, None), x)


def test_text_unet_starts_at_zero_and_depends_on_the_caption():
    model, tok = text_model()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    seven = tok.encode_batch(["a handwritten seven"] * 2, 6)
    one = tok.encode_batch(["the digit 1"] * 2, 6)
    assert torch.equal(model(x, t, seven), torch.zeros_like(x))  # the zero-initialised output conv
    perturb(model)
    model.eval()
    a, b = model(x, t, seven), model(x, t, one)
    assert a.shape == x.shape and torch.isfinite(a).all() and not torch.allclose(a, b)
    assert torch.equal(model(x, t, None), model(x, t, torch.zeros(2, 1, dtype=torch.long)))
    assert (
        sum(isinstance(m, CrossAttentionBlock) for m in model.unet.modules()) == 4
    )  # 4x4: encoder 1, middle 1, decoder 2


def test_context_dim_zero_adds_nothing():
    torch.manual_seed(0)
    plain = UNet(unet_cfg(num_classes=10))
    torch.manual_seed(0)
    with_ctx = UNet(unet_cfg(num_classes=10, context_dim=16))
    assert not any(isinstance(m, CrossAttentionBlock) for m in plain.modules())
    assert sum(isinstance(m, CrossAttentionBlock) for m in with_ctx.modules()) == 4
    # the same parameter names, shapes and count as the UNet before cross-attention existed (pinned from it)
    sd = plain.state_dict()
    names = repr([(k, tuple(v.shape)) for k, v in sd.items()]).encode()
    assert len(sd) == 129 and sum(p.numel() for p in plain.parameters()) == 191_940
    assert hashlib.sha256(names).hexdigest()[:16] == "3862999899de399a"
    with pytest.raises(ValueError, match="context_dim=0"):
        plain(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 2, 16))
    with pytest.raises(ValueError):
        UNetConfig(context_dim=-1)


def test_guidance_with_the_empty_caption_at_scale_zero_is_unconditional():
    model, tok = text_model()
    perturb(model)
    model.eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 900])
    ids = tok.encode_batch(["a handwritten seven", "the digit 1", "a handwritten one"], 6)
    assert model.null_label == PAD_ID
    empty = torch.zeros_like(ids)
    with torch.no_grad():
        uncond = model(x, t, empty)
        assert torch.allclose(ClassifierFreeGuidance(y=ids, scale=0.0).combine(model, x, t), uncond, atol=1e-5)
        assert torch.allclose(
            ClassifierFreeGuidance(y=ids, scale=1.0).combine(model, x, t), model(x, t, ids), atol=1e-5
        )
    # the process samples with (B, L) captions under guidance
    process = GaussianDiffusion(DiffusionConfig(num_timesteps=20))
    out = process.sample(
        model, (3, 4, 8, 8), steps=3, sampler="ddim", guidance=ClassifierFreeGuidance(y=ids, scale=2.0)
    )
    assert out.x.shape == (3, 4, 8, 8) and out.nfe == 6 and torch.isfinite(out.x).all()


def test_caption_dropout_drops_whole_captions():
    ids = torch.arange(1, 41).reshape(20, 2)
    dropped = drop_captions(ids, 0.5, torch.Generator().manual_seed(0))
    rows = [r.tolist() for r in dropped]
    assert all(r in ([0, 0], ids[i].tolist()) for i, r in enumerate(rows)) and [0, 0] in rows and rows != [[0, 0]] * 20
    assert torch.equal(drop_captions(ids, 0.0), ids)


def cfg(**kw) -> LdmTextConfig:
    base = dict(
        train_templates=["a handwritten {word}", "the digit {digit}"],
        heldout_templates=["a sketch of a {digit}"],
        caption_dropout=0.1,
        guidance_scale=2.0,
        sampler="ddim",
        steps=5,
        val_images=8,
        grid_per_class=2,
    )
    return LdmTextConfig(**{**base, **kw})


def test_caption_templates_cover_every_class_and_hold_out_disjoint_ones():
    from pathlib import Path

    import yaml

    section = yaml.safe_load((Path(__file__).parents[4] / "params/images.yaml").read_text())["ldm_text"]
    c = LdmTextConfig(**section)
    assert not set(c.train_templates) & set(c.heldout_templates) and c.heldout_templates
    train, held = captions(c.train_templates, 10), captions(c.heldout_templates, 10)
    assert captions(["a handwritten {word}", "a {digit}"], 10)[7] == ["a handwritten seven", "a 7"]
    assert not {s for row in train for s in row} & {s for row in held for s in row}
    tok = build_tokenizer(c, 10)
    ids = caption_ids(tok, c.heldout_templates, 10, 8)  # (K, T, L)
    assert ids.shape == (10, len(c.heldout_templates), 8)
    # every held-out caption names its class with a word the tokenizer knows, so classes stay distinct
    for k in range(10):
        assert all(
            {str(k), ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][k]}
            & set(row.split())
            & set(tok.index)
            for row in held[k]
        )
    assert (
        len({tuple(ids[k, j].tolist()) for k in range(10) for j in range(ids.shape[1])}) == ids.shape[0] * ids.shape[1]
    )
    with pytest.raises(ValueError, match="disjoint"):
        cfg(heldout_templates=["the digit {digit}"])
    with pytest.raises(ValueError, match="names no class"):
        cfg(heldout_templates=["a digit"])
