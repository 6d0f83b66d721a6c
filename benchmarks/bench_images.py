"""Image-family speed at the committed (default-profile) configuration.

1. Sampling images/s for every sampler (DDPM ancestral and DDIM, the VP SDE's Euler-Maruyama, predictor-
   corrector and probability-flow ODE, latent DDPM with VAE decoding; the DiT with rectified flow at 4 and 32
   Euler steps, with VAE decoding), at a fixed number of steps, with the networks of params/images.yaml. The networks
   are randomly initialised with their zero-initialised output
   layers re-drawn, so the score is not 0 (the adaptive ODE's evaluation count depends on the model; the
   trained count is in data/metrics/diffusion/sde_*.json).
2. FID computation time, ours (float64 statistics, SVD route) against torchmetrics'
   FrechetInceptionDistance on the same features (identity extractor), for 32-d and 2048-d features.
3. The latent cache: one epoch of latent-diffusion training reading cached latents, against encoding each
   batch with the VAE on the fly; the ratio is the cache's speed-up.
4. Classifier-free guidance: one sample set of the `guidance` stage (its sampler and steps, `--images` images)
   at scales 0, 1 and 2, through `ClassifierFreeGuidance.combine` (one network pass where a half has weight
   zero) and `combine_ref` (both halves as one doubled batch at every scale).
5. Channels-last: the pixel UNet (ddpm, sde_vp, sde_ve; the CNF's is the same network) with its weights in
   NCHW against NHWC order (`tasks/training.py: place_model`, `diffusion_train.channels_last`): training
   steps/s at the training batch size, and DDPM ancestral sampling images/s at `--steps`.
6. `torch.compile`: the same pixel UNet (NHWC) eager against `torch.compile(dynamic=False)` (inductor's CPU
   code): the compile time (first training step and first sampling call, less the eager ones), training
   steps/s, sampling images/s, the largest output difference of one forward pass, and after how many
   network evaluations at the sampling batch the compile has paid for itself. Kiln does not compile (the
   figures say why; docs/generative.md).
7. Channels-last for every other convolutional network of the family (the CNF's UNet, the latent UNets of
   ldm and ldm_text, ControlNet on the ddpm UNet, the guidance classifier, RealNVP, the VAE, the FID network),
   NCHW against NHWC at `--threads` intra-op threads (default 1: what a stage gets beside another on 2 cores,
   `runtime.max_parallel: 2`): a training step at the batch size of its `*_train` section (forward, backward
   of the mean squared output, AdamW) and, for the networks the stages sample with, one forward pass at
   the FID batch. The `channels_last` keys of their `*_train` sections follow these rows.

    .venv/bin/python benchmarks/bench_images.py --out benchmarks/results/images.json
    .venv/bin/python benchmarks/bench_images.py --only guidance   # one section, merged into the file
    .venv/bin/python benchmarks/bench_images.py --only channels_last
    .venv/bin/python benchmarks/bench_images.py --only compile
    .venv/bin/python benchmarks/bench_images.py --only channels_last_networks --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from benchmarks.timing import seconds  # noqa: E402  (after the path insert that makes it importable)


def randomise_zero_layers(model) -> None:
    """Re-draw the zero-initialised convolutions so the network's output is not identically 0."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=360, help="images per sampling batch")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/images.json")
    parser.add_argument(
        "--only",
        choices=["guidance", "channels_last", "compile", "channels_last_networks"],
        help="run section 4, 5, 6 or 7 alone and update it in --out",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads in section 7 (a stage's share of the cores)"
    )
    args = parser.parse_args()

    import numpy as np
    import torch

    from flows.registry import section_config
    from models.generative.ddpm import GaussianDiffusion
    from models.generative.dit import DiT
    from models.generative.fid import frechet_distance
    from models.generative.rectified_flow import RectifiedFlow
    from models.generative.sde import build_sde
    from models.generative.unet import UNet
    from models.generative.vae import VAE
    from tasks.generative.images import builtin_digits, to_model_range
    from tasks.training import make_optimizer

    params = ROOT / "params"
    torch.manual_seed(0)
    n, steps = args.images, args.steps
    labels = torch.arange(n) % 10
    results: dict = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results |= {
        "images": n,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
    }

    # 1. sampling --------------------------------------------------------------------------------------
    unet = UNet(section_config(params, "unet")).eval()
    ldm_unet = UNet(section_config(params, "ldm_unet")).eval()
    vae = VAE(section_config(params, "vae")).eval()
    dit = DiT(section_config(params, "dit")).eval()
    for m in (unet, ldm_unet, dit):
        randomise_zero_layers(m)
    if args.only in (None, "channels_last"):
        results["channels_last"] = channels_last_section(params, n, steps)
    if args.only in (None, "guidance"):
        results["guidance"] = guidance_section(params, unet, n)
    if args.only in (None, "compile"):
        results["compile"] = compile_section(params, n, steps)
    if args.only in (None, "channels_last_networks"):
        results["channels_last_networks"] = channels_last_networks_section(params, n, args.threads)
    if args.only:
        write_json(args.out, results)
        return
    rf = RectifiedFlow(section_config(params, "dit_rf"))
    ddpm = GaussianDiffusion(section_config(params, "ddpm"))
    vp = build_sde(section_config(params, "sde_vp"))
    ldm = GaussianDiffusion(section_config(params, "ldm"))
    latent_shape = (ldm_unet.cfg.in_channels, ldm_unet.cfg.image_size, ldm_unet.cfg.image_size)
    cases = {
        "ddpm_ancestral": (ddpm, unet, (1, 16, 16), "ancestral", None, steps),
        "ddpm_ddim": (ddpm, unet, (1, 16, 16), "ddim", None, steps),
        "sde_vp_euler_maruyama": (vp, unet, (1, 16, 16), "euler_maruyama", None, steps),
        "sde_vp_pc": (vp, unet, (1, 16, 16), "pc", None, steps),
        "sde_vp_ode": (vp, unet, (1, 16, 16), "ode", None, steps),
        "ldm_ddim_with_decode": (ldm, ldm_unet, latent_shape, "ddim", vae, steps),
        "dit_rf_euler_4_with_decode": (rf, dit, latent_shape, "euler", vae, 4),
        "dit_rf_euler_32_with_decode": (rf, dit, latent_shape, "euler", vae, 32),
    }
    sampling = {}
    for name, (process, model, shape, sampler, decoder, case_steps) in cases.items():
        out = {}

        def run() -> None:
            g = torch.Generator().manual_seed(0)
            result = process.sample(model, (n, *shape), steps=case_steps, sampler=sampler, generator=g, y=labels)
            if decoder is not None:
                with torch.no_grad():
                    decoder.decode(result.x)
            out["nfe"] = result.nfe

        t = seconds(run)
        sampling[name] = {"images_per_s": n / t, "seconds": t, "nfe": out["nfe"]}
        print(f"sampling {name}: {n / t:.1f} images/s ({out['nfe']} network evaluations per image, {t:.2f} s)")
    results["sampling"] = sampling

    # 2. FID against torchmetrics -------------------------------------------------------------------------
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.num_features = dim

        def forward(self, x):
            return x

    fid_results = {}
    for dim, count in ((32, 5000), (2048, 5000)):
        g = torch.Generator().manual_seed(dim)
        a = torch.randn(count, dim, generator=g, dtype=torch.float64)
        b = torch.randn(count, dim, generator=g, dtype=torch.float64) * 1.1 + 0.1
        ours_value = {}

        def ours() -> None:
            ours_value["fid"] = frechet_distance(a, b).fid

        def theirs() -> None:
            metric = FrechetInceptionDistance(feature=Identity(dim), normalize=True)
            metric.update(a, real=True)
            metric.update(b, real=False)
            ours_value["torchmetrics"] = float(metric.compute())

        t_ours, t_theirs = seconds(ours, 3), seconds(theirs, 3)
        fid_results[f"d{dim}"] = {
            "samples": count,
            "ours_s": t_ours,
            "torchmetrics_s": t_theirs,
            "speedup": t_theirs / t_ours,
            "fid_ours": ours_value["fid"],
            "fid_torchmetrics": ours_value["torchmetrics"],
        }
        print(
            f"FID d={dim}, {count} samples each: ours {t_ours * 1000:.1f} ms, torchmetrics {t_theirs * 1000:.1f} ms "
            f"({t_theirs / t_ours:.1f}x); values {ours_value['fid']:.6f} vs {ours_value['torchmetrics']:.6f}"
        )
    results["fid"] = fid_results

    # 3. latent cache -------------------------------------------------------------------------------------
    train_cfg = section_config(params, "ldm_train")
    digits = to_model_range(builtin_digits(16).pixels)  # all 1,797 images: one epoch
    with torch.no_grad():
        cached = vae.encode(digits)
    model = UNet(section_config(params, "ldm_unet"))
    optimizer = make_optimizer(model, train_cfg)
    y = torch.arange(len(digits)) % 10

    def epoch(encode_on_the_fly: bool) -> None:
        for i in range(0, len(digits), train_cfg.batch_size):
            if encode_on_the_fly:
                with torch.no_grad():
                    z = vae.encode(digits[i : i + train_cfg.batch_size])
            else:
                z = cached[i : i + train_cfg.batch_size]
            loss = ldm.training_losses(model, z, y=y[i : i + train_cfg.batch_size])["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    t_cache, t_fly = seconds(lambda: epoch(False), 2), seconds(lambda: epoch(True), 2)
    results["latent_cache"] = {
        "epoch_images": len(digits),
        "batch_size": train_cfg.batch_size,
        "cached_s": t_cache,
        "on_the_fly_s": t_fly,
        "speedup": t_fly / t_cache,
    }
    print(
        f"latent cache: an epoch of {len(digits)} images takes {t_cache:.2f} s from the cache, {t_fly:.2f} s "
        f"encoding on the fly ({t_fly / t_cache:.2f}x)"
    )

    write_json(args.out, results)
    np.testing.assert_allclose(fid_results["d32"]["fid_ours"], fid_results["d32"]["fid_torchmetrics"], rtol=1e-3)


def guidance_section(params: Path, unet, n: int) -> dict:
    """Seconds for one sample set of the guidance stage at CFG scales 0, 1, 2: `combine` against `combine_ref`."""
    import torch

    from flows.registry import section_config
    from models.generative.ddpm import ClassifierFreeGuidance, GaussianDiffusion

    class BothHalves(ClassifierFreeGuidance):
        """The reference: the doubled batch at every scale."""

        evaluations = 2  # type: ignore[assignment]
        combine = ClassifierFreeGuidance.combine_ref

    cfg = section_config(params, "guidance")
    ddpm = GaussianDiffusion(section_config(params, "ddpm"))
    labels = torch.arange(n) % 10
    rows = {}
    for scale in (0.0, 1.0, 2.0):
        row = {}
        for name, kind in (("combine", ClassifierFreeGuidance), ("combine_ref", BothHalves)):

            def run() -> None:
                g = torch.Generator().manual_seed(0)
                row[f"nfe_{name}"] = ddpm.sample(
                    unet,
                    (n, 1, 16, 16),
                    steps=cfg.steps,
                    sampler=cfg.sampler,
                    generator=g,
                    guidance=kind(y=labels, scale=scale),
                ).nfe

            row[f"{name}_s"] = seconds(run, 1)
        row["speedup"] = row["combine_ref_s"] / row["combine_s"]
        rows[f"scale_{scale:g}"] = row
        print(f"guidance scale {scale:g}: combine {row['combine_s']:.2f} s, combine_ref {row['combine_ref_s']:.2f} s")
    return {"sampler": cfg.sampler, "steps": cfg.steps, "images": n, "scales": rows}


def alternated_best(variants: dict[str, dict[str, Callable[[], object]]], rounds: int) -> dict[str, dict[str, float]]:
    """The fastest of `rounds` timings of every part (name -> call) of every variant, the variants timed in
    alternation within each round: in trials, whichever variant ran first in a process ran slower for a while,
    which timing one after the other reads as the variants' difference."""
    best = {name: dict.fromkeys(parts, float("inf")) for name, parts in variants.items()}
    for _ in range(rounds):
        for name, parts in variants.items():
            for part, call in parts.items():
                best[name][part] = min(best[name][part], seconds(call))
    return best


class PixelUNetBench:
    """What the channels-last and compile sections share: the pixel UNet of params/images.yaml (zero layers
    re-drawn, seed 0), AdamW steps of the DDPM loss on the built-in digits at `diffusion_train.batch_size`,
    and DDPM ancestral sampling of `n` images in `steps` steps, the same seeds for every variant timed."""

    def __init__(self, params: Path, n: int, steps: int) -> None:
        import torch

        from flows.registry import section_config
        from models.generative.ddpm import GaussianDiffusion
        from models.generative.unet import UNet
        from tasks.generative.images import builtin_digits, to_model_range

        self.train_cfg = section_config(params, "diffusion_train")
        self.ddpm = GaussianDiffusion(section_config(params, "ddpm"))
        images = builtin_digits(16)
        self.digits, self.digit_labels = to_model_range(images.pixels), torch.as_tensor(images.labels)
        self.n, self.steps, self.labels = n, steps, torch.arange(n) % 10
        torch.manual_seed(0)
        self.base = UNet(section_config(params, "unet"))
        randomise_zero_layers(self.base)

    def optimizer(self, model):
        from tasks.training import make_optimizer

        return make_optimizer(model, self.train_cfg)

    def train(self, model, optimizer, count: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(count):
            idx = torch.randint(0, len(self.digits), (self.train_cfg.batch_size,), generator=g)
            loss = self.ddpm.training_losses(model, self.digits[idx], y=self.digit_labels[idx], generator=g)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def sample(self, model) -> None:
        """One sampling call, under the no_grad the sampler takes itself, as the stages sample."""
        import torch

        model.eval()
        g = torch.Generator().manual_seed(0)
        self.ddpm.sample(model, (self.n, 1, 16, 16), steps=self.steps, sampler="ancestral", generator=g, y=self.labels)

    def best_times(self, variants: dict, train_steps: int, rounds: int) -> dict[str, dict[str, float]]:
        """The fastest of `rounds` timings of `train_steps` training steps and of one sampling call, per variant
        (name -> (training model, its optimizer, sampling model)), timed in alternation (`alternated_best`)."""
        return alternated_best(
            {
                name: {
                    "train": lambda model=model, opt=opt: self.train(model, opt, train_steps),
                    "sample": lambda sampler=sampler: self.sample(sampler),
                }
                for name, (model, opt, sampler) in variants.items()
            },
            rounds,
        )

    def rows(self, section: str, best: dict[str, dict[str, float]], train_steps: int) -> dict:
        rows = {}
        for name, t in best.items():
            rows[name] = {"train_steps_per_s": train_steps / t["train"], "sample_images_per_s": self.n / t["sample"]}
            print(
                f"{section}, {name}: {train_steps / t['train']:.2f} train steps/s, {self.n / t['sample']:.1f} images/s"
            )
        return rows

    def sizes(self, train_steps: int, rounds: int) -> dict:
        return {
            "batch_size": self.train_cfg.batch_size,
            "train_steps": train_steps,
            "sample_steps": self.steps,
            "rounds": rounds,
        }


def channels_last_section(params: Path, n: int, steps: int, train_steps: int = 20, rounds: int = 3) -> dict:
    """The pixel UNet in NCHW and in NHWC (channels-last) weight order: training steps/s (AdamW, the DDPM
    loss, `diffusion_train.batch_size`) and ancestral sampling images/s, the same seeds for both layouts."""
    import copy

    import torch

    bench = PixelUNetBench(params, n, steps)
    layouts = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    models = {k: copy.deepcopy(bench.base).to(memory_format=f) for k, f in layouts.items()}
    variants = {k: (m, bench.optimizer(m), m) for k, m in models.items()}
    for model, opt, _ in variants.values():  # both warmed up before the timed rounds
        bench.train(model, opt, train_steps)
        bench.sample(model)
    rows = bench.rows("channels-last", bench.best_times(variants, train_steps, rounds), train_steps)
    rows["speedup_train"] = rows["nhwc"]["train_steps_per_s"] / rows["nchw"]["train_steps_per_s"]
    rows["speedup_sample"] = rows["nhwc"]["sample_images_per_s"] / rows["nchw"]["sample_images_per_s"]
    return {**bench.sizes(train_steps, rounds), **rows}


def compile_section(params: Path, n: int, steps: int, train_steps: int = 20, rounds: int = 3) -> dict:
    """The pixel UNet (NHWC) eager and through `torch.compile`: what compiling costs once per process and
    shape, and what it saves per training step and per sampling call (DDPM ancestral, `steps` steps). The
    compile starts from an empty inductor cache, as a user's first run does (a warm one cut it 2-3x)."""
    import copy
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-images-inductor-")

    import torch

    bench = PixelUNetBench(params, n, steps)
    base = bench.base.to(memory_format=torch.channels_last)
    # One module per use: training and sampling are different graphs, each compiled at its first call.
    eager = {"train": copy.deepcopy(base), "sample": copy.deepcopy(base).eval()}
    compiled = {k: torch.compile(copy.deepcopy(m), dynamic=False) for k, m in eager.items()}
    modules = {"eager": eager, "compiled": compiled}
    optimizers = {k: bench.optimizer(m["train"]) for k, m in modules.items()}
    first = {  # the first calls: the compiled ones include the compile
        k: {
            "train": seconds(lambda: bench.train(m["train"], optimizers[k], 1)),
            "sample": seconds(lambda: bench.sample(m["sample"])),
        }
        for k, m in modules.items()
    }
    variants = {k: (m["train"], optimizers[k], m["sample"]) for k, m in modules.items()}
    best = bench.best_times(variants, train_steps, rounds)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        labels = bench.labels
        difference = (eager["sample"](x, t, y=labels) - compiled["sample"](x, t, y=labels)).abs().max().item()
    rows = bench.rows("torch.compile", best, train_steps)
    per_step = {k: {"train": best[k]["train"] / train_steps, "sample": best[k]["sample"]} for k in modules}
    # The compile: the compiled first call's excess over a warm call, less the eager first call's own excess.
    compile_s = {
        part: (first["compiled"][part] - per_step["compiled"][part]) - (first["eager"][part] - per_step["eager"][part])
        for part in ("train", "sample")
    }
    saved_per_eval = (per_step["eager"]["sample"] - per_step["compiled"]["sample"]) / steps  # at batch n
    saved_per_step = per_step["eager"]["train"] - per_step["compiled"]["train"]
    rows |= {
        "compile_s": compile_s,
        "speedup_train": rows["compiled"]["train_steps_per_s"] / rows["eager"]["train_steps_per_s"],
        "speedup_sample": rows["compiled"]["sample_images_per_s"] / rows["eager"]["sample_images_per_s"],
        "max_abs_output_difference": difference,
        "sampling_evaluations_to_pay_back_compile": (
            compile_s["sample"] / saved_per_eval if saved_per_eval > 0 else None
        ),
        "training_steps_to_pay_back_compile": compile_s["train"] / saved_per_step if saved_per_step > 0 else None,
    }
    return {**bench.sizes(train_steps, rounds), "threads": torch.get_num_threads(), **rows}


def conv_networks(params: Path, n: int) -> dict:
    """name -> (params section of its training config, a builder, one training loss, one sampling forward pass
    or None): every convolutional network of the image family other than the pixel UNet of section 5, at the
    shapes the built-in digits give it (16x16x1 images, 10 classes, 4x8x8 latents)."""
    import torch

    from flows.registry import section_config
    from models.generative.controlnet import ControlledUNet, ControlNet
    from models.generative.fid_net import FIDNet
    from models.generative.realnvp import RealNVP
    from models.generative.text_encoder import TextConditionedUNet, TextEncoder
    from models.generative.unet import EncoderClassifier, UNet
    from models.generative.vae import VAE

    def cfg(section: str, **fields):
        from dataclasses import replace

        config = section_config(params, section)
        return replace(config, **{k: v for k, v in fields.items() if hasattr(config, k)})

    pixels = {"in_channels": 1, "image_size": 16, "num_classes": 10}
    latents = {"in_channels": 4, "image_size": 8, "num_classes": 10}
    g = torch.Generator().manual_seed(0)

    def x_t(b: int, shape: tuple[int, ...]) -> tuple:
        return torch.randn(b, *shape, generator=g), torch.rand(b, generator=g) * 999

    def controlled():
        base = UNet(cfg("unet", **pixels))
        return ControlledUNet(base, ControlNet(base, section_config(params, "controlnet")))

    def text_unet():
        encoder = TextEncoder(cfg("text_encoder", vocab_size=40))
        # The UNet attends to the encoder's tokens: its context width is the encoder's (derived_text_fields).
        return TextConditionedUNet(
            UNet(cfg("ldm_text_unet", **{**latents, "num_classes": 0}, context_dim=encoder.cfg.dim)), encoder
        )

    def labels(b: int):
        return torch.arange(b) % 10

    def captions(b: int):
        return torch.randint(1, 40, (b, 6), generator=g)

    def edges(b: int):
        return (torch.rand(b, 1, 16, 16, generator=g) > 0.8).float()

    return {
        "cnf_unet": (
            "cnf_train",
            lambda: UNet(cfg("cnf_unet", **{**pixels, "num_classes": 0})),
            lambda m, b: m(*x_t(b, (1, 16, 16))),
            lambda m: m(*x_t(n, (1, 16, 16))),
        ),
        "ldm_unet": (
            "ldm_train",
            lambda: UNet(cfg("ldm_unet", **latents)),
            lambda m, b: m(*x_t(b, (4, 8, 8)), labels(b)),
            lambda m: m(*x_t(n, (4, 8, 8)), labels(n)),
        ),
        "ldm_text_unet": (
            "ldm_text_train",
            text_unet,
            lambda m, b: m(*x_t(b, (4, 8, 8)), captions(b)),
            lambda m: m(*x_t(n, (4, 8, 8)), captions(n)),
        ),
        "controlnet": (
            "controlnet_train",
            controlled,
            lambda m, b: m(*x_t(b, (1, 16, 16)), labels(b), cond=edges(b)),
            lambda m: m(*x_t(n, (1, 16, 16)), labels(n), cond=edges(n)),
        ),
        "ddpm_unet_sampled_by_guidance": (
            "diffusion_train",
            lambda: UNet(cfg("unet", **pixels)),
            None,
            lambda m: m(*x_t(n, (1, 16, 16)), labels(n)),
        ),
        "guidance_classifier": (
            "guidance_train",
            lambda: EncoderClassifier(cfg("guidance_classifier", **pixels)),
            lambda m, b: m(*x_t(b, (1, 16, 16))),
            None,
        ),
        "realnvp": (
            "realnvp_train",
            lambda: RealNVP(cfg("realnvp", in_channels=1, image_size=16)),
            lambda m, b: m(torch.randn(b, 1, 16, 16, generator=g))[0],
            None,
        ),
        "vae": (
            "vae_train",
            lambda: VAE(cfg("vae", in_channels=1, image_size=16)),
            lambda m, b: m(torch.randn(b, 1, 16, 16, generator=g))[0],
            None,
        ),
        "fid_net": (
            "fid_net_train",
            lambda: FIDNet(cfg("fid_net", **pixels)),
            lambda m, b: m(torch.randn(b, 1, 16, 16, generator=g)),
            None,
        ),
    }


def channels_last_networks_section(params: Path, n: int, threads: int, steps: int = 10, rounds: int = 3) -> dict:
    """Section 7: per network, training steps/s and sampling-batch forward passes/s in NCHW and NHWC, the best
    of `rounds` alternated timings, and the speed-ups the `channels_last` keys are set from."""
    import copy

    import torch

    from flows.registry import section_config
    from tasks.training import make_optimizer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: dict = {}
    try:
        for name, (train_section, build, train_out, sample_out) in conv_networks(params, n).items():
            train_cfg = section_config(params, train_section)
            torch.manual_seed(0)
            base = build()
            randomise_zero_layers(base)
            layouts = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
            models = {k: copy.deepcopy(base).to(memory_format=f) for k, f in layouts.items()}
            optimizers = {k: make_optimizer(m, train_cfg) for k, m in models.items()}

            def train(m, opt, count=steps) -> None:
                m.train()
                for _ in range(count):
                    loss = train_out(m, train_cfg.batch_size).float().square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

            def forward(m) -> None:
                m.eval()
                with torch.no_grad():
                    sample_out(m)

            for k, m in models.items():  # warm-up, both layouts
                if train_out:
                    train(m, optimizers[k], 2)
                if sample_out:
                    forward(m)
            parts = {
                k: {
                    **({"train": lambda m=m, opt=optimizers[k]: train(m, opt)} if train_out else {}),
                    **({"sample": lambda m=m: forward(m)} if sample_out else {}),
                }
                for k, m in models.items()
            }
            best = alternated_best(parts, rounds)
            row: dict = {"train_section": train_section, "channels_last_key": train_cfg.channels_last}
            if train_out:
                row |= {
                    "train_batch": train_cfg.batch_size,
                    "nchw_train_steps_per_s": steps / best["nchw"]["train"],
                    "nhwc_train_steps_per_s": steps / best["nhwc"]["train"],
                    "speedup_train": best["nchw"]["train"] / best["nhwc"]["train"],
                }
            if sample_out:
                row |= {
                    "sample_batch": n,
                    "nchw_forward_s": best["nchw"]["sample"],
                    "nhwc_forward_s": best["nhwc"]["sample"],
                    "speedup_sample": best["nchw"]["sample"] / best["nhwc"]["sample"],
                }
            rows[name] = row
            print(
                f"channels-last, {name}: train x{row.get('speedup_train', float('nan')):.2f}, "
                f"sampling forward x{row.get('speedup_sample', float('nan')):.2f}",
                flush=True,
            )
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "train_steps": steps, "rounds": rounds, "networks": rows}


if __name__ == "__main__":
    main()
