"""The generators as MLflow models: every `diffusion@*`, `ldm_text`, `controlnet`, `guidance` and `nflow@*` logged
to its stage's run and registered as `kiln-gen-<stage>` (`@` as `-`: `kiln-gen-diffusion-ddpm`, alias `newest`),
each a pyfunc that samples the way `kiln sample` does (tasks/generative/sampling.py: `sample_stage`).

Not part of any stage's computation: `tasks/model_logging.py` calls `log_generator` after the stage's task returned,
with its open run, and no stage's task module imports this one (so editing it stales no DVC stage).

The artifact `project` is a small project tree holding exactly the files `sample_stage` reads for this stage: at
logging time one tiny sample (the input example) runs under an audit hook that records every file opened under
the project root (params/*.yaml, the model, the VAE of a latent model, ...); those are copied with their relative
paths. A parquet file read only for its schema (the class names, the images' digest) is copied as an empty table
with that schema. The sample is then drawn again from the copy and must be the same images, so a logged model
cannot depend on a file left behind. `load_context` samples from that tree, never from the project.

Input: a DataFrame, one row per request (the rows' images are concatenated in row order). Columns, by stage:
`label` (diffusion@*, guidance, controlnet; string: a class name or a 0-based index, empty: the classes in turn,
for controlnet the unconditional base), `prompt` (ldm_text; string), `edges` (controlnet; string: the path of a
PNG edge map of the training images' size, ink >= 128 is an edge; a relative path is looked up in the model's
own tree first, where `examples/edges.png` lies), and for every stage `n` (images), `steps` (sampler steps, 0:
the stage's own default; RealNVP takes 0 only) and `seed`. Output: uint8 array (N, H, W, C), pixels 0..255.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from tasks.spec import StageContext
from tasks.tracking import pinned_requirements

REGISTERED_PREFIX = "kiln-gen-"
EXAMPLE_IMAGES = 2  # per input example (and per logging-time sample)
EXAMPLE_STEPS = 2  # sampler steps of the input example: logging stays fast; 0 in a request is the stage's own
EXAMPLE_EDGES = "examples/edges.png"  # controlnet's example edge map, inside the model's tree
HEADLINE_KEYS = ("fid", "class_accuracy", "test_bpd", "classifier_selected_test_fid", "classifier_selected_scale")
SKIPPED_DIRS = (".git", ".dvc", "mlruns", "mlartifacts")  # never part of a model's tree
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth", ".pyi")


def registered_name(stage: str) -> str:
    return REGISTERED_PREFIX + stage.replace("@", "-")


def input_columns(stage: str) -> tuple[str, ...]:
    """The pyfunc's input columns for `stage`."""
    base = stage.partition("@")[0]
    conditioning = {"ldm_text": ("prompt",), "controlnet": ("edges", "label"), "nflow": ()}.get(base, ("label",))
    return (*conditioning, "n", "steps", "seed")


def request_of(stage: str, row: Mapping[str, Any], files: Path):
    """One input row as `kiln sample`'s request (empty strings and 0 steps: not given; a relative `edges` path
    is looked up under `files` first)."""
    from tasks.generative.sampling import SampleRequest

    def text(column: str) -> str | None:
        value = row.get(column)
        return (
            None if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "" else str(value)
        )

    edges = text("edges")
    edge_path = None
    if edges is not None:
        edge_path = Path(edges)
        if not edge_path.is_absolute() and (files / edge_path).is_file():
            edge_path = files / edge_path
    return SampleRequest(
        stage=stage,
        n=int(row.get("n", 1)),
        label=text("label"),
        prompt=text("prompt"),
        edges=edge_path,
        steps=int(row.get("steps", 0) or 0) or None,
        seed=int(row.get("seed", 0)),
    )


def sample_pixels(
    root: Path, stage: str, frame: pd.DataFrame, device: str = "cpu", files: Path | None = None
) -> np.ndarray:
    """Every row's images from the model under `root`, concatenated: uint8 (N, H, W, C). A relative `edges`
    path is looked up under `files` (default `root`) first."""
    from tasks.generative.images import to_pixels
    from tasks.generative.sampling import sample_stage

    batches = []
    for row in frame.to_dict("records"):
        samples = sample_stage(root, request_of(stage, row, files or root), device)
        batches.append(to_pixels(samples.images).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(batches))


class GeneratorSampler(mlflow.pyfunc.PythonModel):
    """Samples one trained generator (`diffusion@ddpm`, `nflow@cnf`, ...) from the project tree it was logged
    with, as `kiln sample` does. `model_config={"device": "cuda"}` at load time samples on a GPU."""

    def __init__(self, stage: str):
        self.stage = stage
        self.root: Path | None = None
        self.device = "cpu"

    def load_context(self, context) -> None:
        self.root = Path(context.artifacts["project"]).resolve()
        self.device = str((context.model_config or {}).get("device", "cpu"))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        assert self.root is not None, "load_context was not called"
        return sample_pixels(self.root, self.stage, frame, self.device)


# ------------------------------------------------------------------------------------ what a sample reads

_RECORDERS: list[set[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _RECORDERS:
        return
    path, mode, flags = (tuple(args) + (None, None))[:3]
    if isinstance(path, int) or path is None:
        return
    if mode is not None:
        if any(c in str(mode) for c in "wax+"):
            return
    elif isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR):
        return
    _RECORDERS[-1].add(os.path.abspath(os.fsdecode(path)))


_HOOKED: list[bool] = []


@contextmanager
def files_read() -> Iterator[tuple[set[str], set[str]]]:
    """(files opened for reading, parquet files whose schema alone was read) while the body runs: Python's
    "open" audit event, and `pyarrow.parquet.read_schema`, which opens its file in C++ (no audit event)."""
    import pyarrow.parquet as pq

    if not _HOOKED:  # an audit hook cannot be removed: one, idle unless a recorder is open
        sys.addaudithook(_audit)
        _HOOKED.append(True)
    opened: set[str] = set()
    schemas: set[str] = set()
    read_schema = pq.read_schema

    def recording_read_schema(where, *args, **kwargs):
        if isinstance(where, (str, os.PathLike)):
            schemas.add(os.path.abspath(os.fsdecode(where)))
        return read_schema(where, *args, **kwargs)

    _RECORDERS.append(opened)
    pq.read_schema = recording_read_schema
    try:
        yield opened, schemas
    finally:
        pq.read_schema = read_schema
        _RECORDERS.remove(opened)


def model_tree(root: Path, opened: set[str], schemas: set[str], dest: Path) -> list[str]:
    """Copy the files under `root` among `opened` (and `schemas`, as empty tables) to `dest`, relative paths
    kept; returns the relative paths copied."""
    import pyarrow.parquet as pq

    root, prefix = root.resolve(), Path(sys.prefix).resolve()
    copied = []
    for name in sorted(opened | schemas):
        path = Path(name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue
        rel = path.relative_to(root)
        if rel.parts[0] in SKIPPED_DIRS or path.suffix in CODE_SUFFIXES or path.is_relative_to(prefix):
            continue  # the store, and the code imported on the way (the environment, not the model)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in schemas and name not in opened:
            pq.write_table(pq.read_schema(path).empty_table(), target)
        else:
            shutil.copy2(path, target)
        copied.append(rel.as_posix())
    return copied


# ------------------------------------------------------------------------------------ logging


def example_input(root: Path, stage: str, tree: Path) -> pd.DataFrame:
    """A real request: the first class (or a caption, an edge map of a test image), tiny steps."""
    from tasks.generative.sampling import class_names

    base, _, item = stage.partition("@")
    steps = 0 if stage == "nflow@realnvp" else EXAMPLE_STEPS
    row: dict[str, Any] = {}
    if base == "ldm_text":
        row["prompt"] = f"the digit {class_names(root)[0]}"
    elif base == "controlnet":
        from PIL import Image

        from tasks.layout import CONTROLNET_DIR

        edges = np.load(root / CONTROLNET_DIR / "edges" / "test.npy", mmap_mode="r")[0, 0]
        (tree / EXAMPLE_EDGES).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.asarray(edges) > 0).astype(np.uint8) * 255).save(tree / EXAMPLE_EDGES)
        row["edges"], row["label"] = EXAMPLE_EDGES, ""
    elif base != "nflow":
        row["label"] = class_names(root)[0]
    row.update(n=EXAMPLE_IMAGES, steps=steps, seed=0)
    return pd.DataFrame([row], columns=list(input_columns(stage)))


def model_description(stage: str, shape: tuple[int, ...]) -> str:
    _, h, w, c = shape
    columns = {
        "label": "`label` (string: a class name or a 0-based class index; empty: the classes in turn"
        + (", for controlnet the unconditional base)" if stage == "controlnet" else ")"),
        "prompt": "`prompt` (string: the caption)",
        "edges": "`edges` (string: path of a PNG edge map of the training images' size, ink >= 128 is an edge; "
        f"a relative path is looked up in the model's artifact `project` first, where `{EXAMPLE_EDGES}` lies)",
        "n": "`n` (long: images)",
        "steps": "`steps` (long: sampler steps, 0 = the stage's default"
        + ("; RealNVP takes 0 only)" if stage == "nflow@realnvp" else ")"),
        "seed": "`seed` (long: the same seed gives the same images)",
    }
    return (
        f"Kiln: the generator of stage `{stage}`, as a pyfunc that samples the way `kiln sample {stage}` does "
        "(tasks/generative/sampling.py). Input: a DataFrame, one row per request, columns "
        + ", ".join(columns[c] for c in input_columns(stage))
        + f". Output: uint8 array (N, {h}, {w}, {c}), the rows' images in row order, pixels 0..255 (N, H, W, C). "
        "Loads in the Kiln environment (the pyfunc's class is tasks/generative/logged_models.py) from its own "
        "artifact `project` (the files the sampler reads); `model_config={'device': 'cuda'}` samples on a GPU. "
        "Alias `newest` follows the last registered version."
    )


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in HEADLINE_KEYS if isinstance(metrics.get(k), (int, float))}


def log_generator(ctx: StageContext, stage: str, metrics: Mapping[str, Any]) -> str:
    """Log the trained generator of `stage` to its stage's run and register it; returns `<registered>@newest`."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.params import params_files

    run, root = ctx.run, ctx.root.resolve()
    registered = registered_name(stage)
    with tempfile.TemporaryDirectory(prefix="kiln-gen-model-") as tmp:
        tree = Path(tmp) / "project"
        tree.mkdir()
        example = example_input(root, stage, tree)
        with files_read() as (opened, schemas):
            expected = sample_pixels(root, stage, example, files=tree)
        # Every params file, whether or not this process had them parsed already (tasks/params.py caches them).
        opened |= {str(p.resolve()) for p in params_files(root / "params")}
        copied = model_tree(root, opened, schemas, tree)
        output = sample_pixels(tree, stage, example)
        if not np.array_equal(output, expected):
            raise RuntimeError(f"{stage}: the logged tree samples other images than the project ({copied})")
        run_tags = run.client.get_run(run.run_id).data.tags
        figures = headline(metrics)
        tags = {
            "kiln.stage": stage,
            "kiln.generator": stage,
            "kiln.profile": run_tags.get("kiln.profile", ""),
            "mlflow.source.git.commit": run_tags.get("mlflow.source.git.commit", ""),
            **{f"kiln.{k}": f"{v:.6g}" for k, v in figures.items()},
        }
        description = model_description(stage, output.shape)
        info = run.log_model(
            mlflow.pyfunc,
            "gen-" + stage.replace("@", "-"),
            tags=tags,
            python_model=GeneratorSampler(stage),
            artifacts={"project": str(tree)},
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=registered,
            # Explicit, so MLflow does not load the model in a subprocess to infer them.
            pip_requirements=pinned_requirements("mlflow", "torch", "numpy", "pandas", "pyarrow", "pillow", "prefect"),
            metadata={"description": description, "files": copied},
        )
    version = str(info.registered_model_version)
    client = run.client
    client.update_registered_model(registered, description=description)
    scored = ", ".join(f"{k} {v:.6g}" for k, v in figures.items()) or "no headline metrics"
    client.update_model_version(
        registered,
        version,
        description=f"{description}\n\nFrom run {run.run_id} (stage `{stage}`, profile {tags['kiln.profile']}, "
        f"commit {tags['mlflow.source.git.commit']}): {scored}.",
    )
    for key, value in tags.items():
        client.set_model_version_tag(registered, version, key, value)
    client.set_registered_model_tag(registered, "kiln.generator", stage)
    client.set_registered_model_alias(registered, "newest", version)
    run.set_tags({f"registered_model.{stage.replace('@', '-')}": f"{registered}@newest (version {version})"})
    return f"{registered}@newest"
