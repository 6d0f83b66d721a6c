"""Generative family models: DDPM, score SDEs, rectified flow, UNet, VAE, DiT, ControlNet,
text encoder, RealNVP and the flow-matching CNF (normalizing flows), and the FID feature network and math."""
