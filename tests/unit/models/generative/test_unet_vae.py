"""models/generative/unet.py and models/generative/vae.py: shapes, zero-init, labels and guidance, the KL term, a few
training steps."""

from __future__ import annotations

import io

import pytest
import torch

from models.generative.ddpm import ClassifierFreeGuidance, ClassifierGuidance, DiffusionConfig, GaussianDiffusion
from models.generative.unet import EncoderClassifier, UNet, UNetConfig, timestep_embedding
from models.generative.vae import VAE, VAEConfig, gaussian_kl, psnr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_unet_config(**overrides) -> UNetConfig:
    kwargs = dict(
        in_channels=1,
        image_size=8,
        base_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        num_heads=2,
        num_groups=4,
        dropout=0.0,
    )
    return UNetConfig(**{**kwargs, **overrides})


def _randomise_output(model: UNet) -> None:
    """Zero-init makes every output 0; perturb the zeroed layers so comparisons mean something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and "norm" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------- UNet


def test_unet_shapes_and_zero_init_output():
    torch.manual_seed(0)
    model = UNet(tiny_unet_config())
    x = torch.randn(3, 1, 8, 8)
    for t in (torch.tensor([0, 10, 999]), torch.tensor([0.01, 0.5, 1.0]), torch.tensor(5)):
        out = model(x, t)
        assert out.shape == (3, 1, 8, 8)
        assert torch.equal(out, torch.zeros_like(out))  # exactly 0 at init
    wide_cfg = tiny_unet_config(
        in_channels=3, out_channels=6, image_size=16, channel_mult=[1, 2, 2], attention_resolutions=[8, 4]
    )
    wide = UNet(wide_cfg)
    assert wide(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 6, 16, 16)


def test_unet_class_labels_and_null_label():
    torch.manual_seed(0)
    model = UNet(tiny_unet_config(num_classes=10))
    assert model.null_label == 10 and model.label_embed.num_embeddings == 11
    _randomise_output(model)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 3, 3, 3])
    y = torch.tensor([0, 1, 2, 10])
    out = model(x, t, y=y)
    assert out.shape == (4, 1, 8, 8) and out.abs().sum() > 0
    assert not torch.allclose(out[0], model(x, t, y=torch.tensor([5, 1, 2, 10]))[0])  # labels matter
    torch.testing.assert_close(model(x, t), model(x, t, y=torch.full((4,), 10)))  # y=None is the null label
    with pytest.raises(ValueError, match="unconditional"):
        UNet(tiny_unet_config())(x, t, y=y)


def test_classifier_free_guidance_scale_zero_is_unconditional():
    torch.manual_seed(0)
    model = UNet(tiny_unet_config(num_classes=3)).eval()
    _randomise_output(model)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 100, 500]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        uncond = model(x, t)
        cond = model(x, t, y=y)
        torch.testing.assert_close(ClassifierFreeGuidance(y, 0.0).combine(model, x, t), uncond, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ClassifierFreeGuidance(y, 1.0).combine(model, x, t), cond, atol=1e-6, rtol=1e-5)
        w3 = ClassifierFreeGuidance(y, 3.0).combine(model, x, t)
        torch.testing.assert_close(w3, uncond + 3 * (cond - uncond), atol=1e-6, rtol=1e-5)


def test_unet_time_embedding_and_input_checks():
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 500.0]), 16)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))  # cos 0, sin 0
    model = UNet(tiny_unet_config())
    with pytest.raises(ValueError, match="expected x"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expected t"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))
    for kwargs, field in [
        ({"num_groups": 5}, "num_groups"),
        ({"attention_resolutions": [3]}, "attention_resolutions"),
        ({"image_size": 9}, "image_size"),
        ({"channel_mult": []}, "channel_mult"),
        ({"dropout": 1.0}, "dropout"),
    ]:
        with pytest.raises(ValueError, match=field):
            tiny_unet_config(**kwargs)


def test_unet_trains_with_the_diffusion_loss_and_round_trips():
    torch.manual_seed(0)
    model = UNet(tiny_unet_config(num_classes=2))
    gd = GaussianDiffusion(DiffusionConfig(num_timesteps=100, p_uncond=0.2))
    x0 = torch.randn(8, 1, 8, 8).clamp(-1, 1)
    y = torch.randint(0, 2, (8,))
    losses = gd.training_losses(model, x0, y=y)
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert losses["loss"].ndim == 0 and len(grads) == len(list(model.parameters()))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = UNet(tiny_unet_config(num_classes=2))
    clone.load_state_dict(torch.load(buf, weights_only=True))
    _randomise_output(model)
    clone.load_state_dict(model.state_dict())
    t = torch.tensor([5] * 8)
    model.eval(), clone.eval()
    torch.testing.assert_close(model(x0, t, y=y), clone(x0, t, y=y), rtol=0, atol=0)


def test_encoder_classifier_logits_and_guidance_gradient():
    torch.manual_seed(0)
    clf = EncoderClassifier(tiny_unet_config(num_classes=5))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 90])
    logits = clf(x, t)
    assert logits.shape == (3, 5)
    grad = ClassifierGuidance(clf, torch.tensor([0, 1, 4]), 2.0).grad_log_prob(x, t)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_classes"):
        EncoderClassifier(tiny_unet_config())
    # guided DDIM with a (random) classifier runs end to end through the sampler
    model = UNet(tiny_unet_config())
    gd = GaussianDiffusion(DiffusionConfig(num_timesteps=20))
    out = gd.sample(model, (3, 1, 8, 8), sampler="ddim", guidance=ClassifierGuidance(clf, torch.tensor([0, 1, 4]), 1.0))
    assert out.x.shape == (3, 1, 8, 8) and torch.isfinite(out.x).all()


# ---------------------------------------------------------------------------------------- VAE


def tiny_vae_config(**overrides) -> VAEConfig:
    kwargs = dict(
        in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, latent_channels=2, num_groups=4
    )
    return VAEConfig(**{**kwargs, **overrides})


def test_vae_round_trip_shapes():
    torch.manual_seed(0)
    vae = VAE(tiny_vae_config())
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    mean, logvar = vae.encode_moments(x)
    assert mean.shape == logvar.shape == (5, 2, 4, 4)
    z = vae.encode(x)
    torch.testing.assert_close(z, mean)  # default: the posterior mean
    z_sample = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert z_sample.shape == z.shape and not torch.equal(z_sample, z)
    assert vae.decode(z).shape == x.shape
    x_rec, m, lv = vae(x)
    assert x_rec.shape == x.shape
    deeper = VAE(tiny_vae_config(channel_mult=[1, 1, 2], in_channels=3, latent_channels=4))
    assert deeper.encode(torch.randn(2, 3, 16, 16)).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="divisible"):
        deeper.encode(torch.randn(2, 3, 10, 10))


def test_gaussian_kl():
    zeros = torch.zeros(3, 2, 4, 4)
    assert torch.equal(gaussian_kl(zeros, zeros), torch.zeros(3))
    mean, logvar = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)
    assert (gaussian_kl(mean, logvar) > 0).all()


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 in a [-1, 1] range: 10 log10(4 / 0.01)
    values = psnr(x, y)
    assert values[0].item() == pytest.approx(26.0206, abs=1e-3)
    assert values[1].item() > 100  # identical images: capped, finite
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_vae_loss_terms_and_a_few_steps_reduce_it():
    torch.manual_seed(0)
    vae = VAE(tiny_vae_config(kl_weight=1e-3))
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(8, 1, 8, 8, generator=g) > 0.5).float() * 2 - 1  # toy binary images
    losses = vae.training_losses(x, generator=torch.Generator().manual_seed(2))
    assert set(losses) == {"loss", "reconstruction", "kl"}
    expected = losses["reconstruction"].item() + 1e-3 * losses["kl"].item()
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        loss = vae.training_losses(x, generator=torch.Generator().manual_seed(step))["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = vae.training_losses(x, generator=torch.Generator().manual_seed(99))["loss"].item()
    assert final < 0.7 * first
    l1 = VAE(tiny_vae_config(reconstruction="l1")).training_losses(x)
    assert torch.isfinite(l1["loss"])
    with pytest.raises(ValueError, match="kl_weight"):
        tiny_vae_config(kl_weight=-1.0)
