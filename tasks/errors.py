"""The one input-error type. An error a user causes with their data, params or artefacts subclasses
`InputError`; the CLI prints it as one line with exit status 2 (a bug still shows its traceback)."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: the message names the file, key or record at fault."""


class ContaminationError(InputError):
    """More val or test records than a params threshold allows have a (near) duplicate in train (the audit
    stages). Always one line: a line break (from a file name in a record's source, say) is written as its
    escape."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class StaleArtefact(InputError):
    """A trained artefact whose recorded data (vocabulary, labels, image size, latent scale...) is not the current
    data's, or that records none: the message names the file and the stage to rerun (see `require_meta`)."""


def shown_path(root: Path, path: Path) -> str:
    """`path` relative to the project root where it lies inside it, as the messages name files."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def rerun_hint(stage: str) -> str:
    """The end of every stale-artefact message: the stage that makes the artefact again."""
    return f"rerun `dvc repro {stage}` (or `kiln run --target {stage}`)"
