"""Generative family tasks: images, FID network, VAE and latents, diffusion, guidance, DiT ablation,
text-conditioned LDM, ControlNet and normalizing flows."""
