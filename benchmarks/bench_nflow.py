"""Normalizing-flow speed at the committed (default-profile) configuration.

1. Sampling images/s: RealNVP (one inverse pass) and the CNF (RK4 with `cnf.sample_steps`, 4 UNet
   evaluations a step), for a batch of --images.
2. CNF likelihood evaluation time per image with the exact trace (one backward pass per dimension, D = 256
   for 16x16 gray) against Hutchinson's estimator (one vector-Jacobian product), on --likelihood-images
   images with --likelihood-steps RK4 steps; and how far the two bits/dim lie apart.

Networks are randomly initialised with their zero-initialised output layers re-drawn, so the vector field
is not 0.

    .venv/bin/python benchmarks/bench_nflow.py --out benchmarks/results/nflow.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from benchmarks.timing import seconds  # noqa: E402  (after the path insert that makes it importable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=360, help="images per sampling batch")
    parser.add_argument("--likelihood-images", type=int, default=2)
    parser.add_argument("--likelihood-steps", type=int, default=2, help="RK4 steps of the likelihood ODE")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/nflow.json")
    args = parser.parse_args()

    import torch

    from flows.registry import section_config
    from models.generative.cnf import FlowMatching
    from models.generative.realnvp import RealNVP
    from models.generative.unet import UNet

    params = ROOT / "params"
    torch.manual_seed(0)
    n = args.images
    results: dict = {
        "images": n,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
    }

    realnvp = RealNVP(section_config(params, "realnvp"))
    realnvp.train()
    realnvp(torch.randn(64, 1, 16, 16))  # actnorm's data-dependent init
    unet = UNet(section_config(params, "cnf_unet"))
    with torch.no_grad():
        for m in (realnvp, unet):
            for p in m.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.02)
    realnvp.eval()
    unet.eval()
    cnf_cfg = section_config(params, "cnf")

    # 1. sampling ------------------------------------------------------------------------------------------
    process = FlowMatching(cnf_cfg)
    t_realnvp = seconds(lambda: realnvp.sample(n, torch.Generator().manual_seed(0)))
    out = {}

    def cnf_sample() -> None:
        out["nfe"] = process.sample(unet, (n, 1, 16, 16), torch.Generator().manual_seed(0))[1]

    t_cnf = seconds(cnf_sample)
    results["sampling"] = {
        "realnvp": {"images_per_s": n / t_realnvp, "seconds": t_realnvp, "nfe": 1},
        "cnf_rk4": {"images_per_s": n / t_cnf, "seconds": t_cnf, "nfe": out["nfe"]},
    }
    print(f"sampling realnvp: {n / t_realnvp:.1f} images/s ({t_realnvp:.2f} s)")
    print(f"sampling cnf (rk4, {out['nfe']} evaluations): {n / t_cnf:.1f} images/s ({t_cnf:.2f} s)")

    # 2. CNF likelihood: exact trace against Hutchinson ---------------------------------------------------
    k = args.likelihood_images
    y = torch.rand(k, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    likelihood = {}
    for trace in ("exact", "hutchinson"):
        # a fixed RK4 grid: both traces run the same evaluations, so the times compare the trace alone
        proc = FlowMatching(
            replace(cnf_cfg, trace=trace, likelihood_solver="rk4", likelihood_steps=args.likelihood_steps)
        )
        value = {}

        def run() -> None:
            bpd, nfe = proc.bits_per_dim(unet, y, torch.Generator().manual_seed(0))
            value["bpd"], value["nfe"] = float(bpd.mean()), nfe

        t = seconds(run)
        likelihood[trace] = {"seconds": t, "seconds_per_image": t / k, "nfe": value["nfe"], "bpd": value["bpd"]}
        print(f"likelihood {trace}: {t / k:.3f} s per image ({value['nfe']} evaluations), {value['bpd']:.4f} bits/dim")
    likelihood["exact_over_hutchinson"] = likelihood["exact"]["seconds"] / likelihood["hutchinson"]["seconds"]
    likelihood.update(images=k, rk4_steps=args.likelihood_steps)
    results["cnf_likelihood"] = likelihood

    write_json(args.out, results)


if __name__ == "__main__":
    main()
