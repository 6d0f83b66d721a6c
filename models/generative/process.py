"""What every generative process offers the tasks, whatever network it drives.

GaussianDiffusion (ddpm.py), the score SDEs VPSDE / VESDE (sde.py) and RectifiedFlow (rectified_flow.py)
all implement `GenerativeProcess`, so a task trains and samples any of them through one call shape:

    process.training_losses(model, x0, y=y)["loss"]                       # the training objective
    process.sample(model, shape, steps=, sampler=, guidance=, generator=, device=, y=)  # -> SampleOutput
    process.prior(shape, generator, device)                               # x_T, where sampling starts

`model(x_t, t_in, **cond)` is any network; each process decides what t_in is (integer DDPM steps, or a
continuous t times its `time_input_scale`). `sampler` names one of the process's own samplers:
"ancestral" / "ddim" (diffusion), "euler_maruyama" / "pc" / "ode" (SDEs), "euler" (rectified flow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from models.generative.ddpm import Guidance, SampleOutput


def broadcast_to(t_or_coeff: Tensor, x: Tensor) -> Tensor:
    """A per-example (B,) tensor as (B, 1, ..., 1) in x's dtype, so it scales each example of x (B, ...)."""
    return t_or_coeff.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


@runtime_checkable
class GenerativeProcess(Protocol):
    """The interface shared by the diffusion, score-SDE and rectified-flow processes.

    `isinstance(p, GenerativeProcess)` checks that the three methods exist (runtime_checkable checks names,
    not signatures); the signatures below are the ones all three share.
    """

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond: Any,
    ) -> dict[str, Tensor]:
        """{"loss": scalar mean over the batch (what is optimised), "mse_per_sample": (B,) detached}.
        `t` and `noise` default to draws from `generator`; `cond` goes to the model (e.g. y=labels)."""
        ...

    def sample(
        self,
        model: Callable[..., Tensor],
        shape: tuple[int, ...],
        *,
        steps: int | None = None,
        sampler: Any = ...,  # each process's own sampler names (a Literal per process)
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
        **cond: Any,
    ) -> SampleOutput:
        """Samples of `shape` from x_T (default: `prior(shape, generator, device)`) and the number of network
        evaluations; `steps=None` is the process's default."""
        ...

    def prior(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """The noise x_T that sampling starts from, (shape) drawn with `generator`."""
        ...
