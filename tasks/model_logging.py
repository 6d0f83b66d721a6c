"""Models logged after a stage's task returned, for stages whose task module logs none itself.

`flows/factory.py` calls `log_stage_models` with the stage's open MLflow run once its task has written its
outputs. The logging lives in a family module of its own (`tasks/text/logged_models.py`), not in the task
modules, because those are DVC deps of expensive stages: this step only reads the stage's outputs and logs,
so changing it must stale nothing. Infrastructure names no family module in an import (docs/design.md,
rule 4): `MODEL_LOGGERS` names them as strings and only the stage's own entry is imported.

Adding a family's models is one entry: stage name (before `@`) -> `module:function`, where the function
takes `(ctx: StageContext, stage: str, metrics)` and returns what it registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from tasks.phases import in_phase
from tasks.spec import StageContext

MODEL_LOGGERS: dict[str, str] = {
    "ngram": "tasks.text.logged_models:log_language_model",
    "lm": "tasks.text.logged_models:log_language_model",
    "diffusion": "tasks.generative.logged_models:log_generator",
    "ldm_text": "tasks.generative.logged_models:log_generator",
    "controlnet": "tasks.generative.logged_models:log_generator",
    "guidance": "tasks.generative.logged_models:log_generator",
    "nflow": "tasks.generative.logged_models:log_generator",
}


def model_logger(base: str) -> Callable[[StageContext, str, Mapping[str, Any]], str] | None:
    """The function that logs stage `base`'s models (None: it has none to log here)."""
    target = MODEL_LOGGERS.get(base)
    if target is None:
        return None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


@in_phase("io")
def log_stage_models(base: str, ctx: StageContext, metrics: Mapping[str, Any]) -> str | None:
    """Log and register the models of the stage run `ctx` (stage `base`, item `ctx.item`) to its run.

    A failure is printed and recorded as the run's `kiln.model_logging_error` tag, not raised: the stage's
    outputs are written and valid, and DVC should keep them; the next run of the stage logs again."""
    log = model_logger(base)
    if log is None or not hasattr(ctx.run, "run_id"):  # a torchrun rank other than 0 logs nothing
        return None
    stage = f"{base}@{ctx.item}" if ctx.item else base
    try:
        registered = log(ctx, stage, metrics)
    except Exception as err:  # noqa: BLE001 - reported on the run, see the docstring
        message = f"{type(err).__name__}: {err}"
        print(f"warning: {stage}: its model was not logged to MLflow ({message})")
        try:
            ctx.run.set_tags({"kiln.model_logging_error": message[:5000]})
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            pass
        return None
    print(f"{stage}: model registered as {registered}")
    return registered
