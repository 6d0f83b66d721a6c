"""The one input-error type. An error a user causes with their data, params or artefacts subclasses
`InputError`; the CLI prints it as one line with exit status 2 (a bug still shows its traceback)."""


class InputError(ValueError):
    """Bad input: the message names the file, key or record at fault."""
