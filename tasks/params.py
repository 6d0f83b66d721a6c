"""The one params loader: YAML sections onto config dataclasses, strictly.

Every section of every `params/*.yaml` maps 1:1 to a dataclass: the stage specs name the class of each
section they read (`tasks/spec.py`); which file holds a section is read from the files themselves, so a
new section is one YAML edit and no registry. Section names are unique across the files. Loading
is strict: an unknown key, a missing key or a value of the wrong type raises `ParamsError` naming the
file and the dotted key. The only conversion is the lossless int -> float widening (`lr: 1` for a
float field); bools are never numbers and strings are never parsed. Every float must be finite (YAML's
`.nan`, `.inf`, `-.inf` are errors). Files are read with plain YAML tags only, at most `MAX_PARAMS_BYTES`
long and with at most `MAX_ALIAS_EXPANSIONS` nodes reached through aliases (no "billion laughs").

Profiles (`params/profiles/NAME.yaml`) are overlays `file -> section -> key -> value`. Every profile
names the same keys, so switching from any profile to any other rewrites exactly those values and DVC
sees exactly which params changed. Files are rewritten with ruamel's round-trip mode so that their
comments survive.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq
from ruamel.yaml.nodes import MappingNode, SequenceNode

from tasks.errors import InputError
from tasks.io import atomic_path

T = TypeVar("T")


class ParamsError(InputError):
    """Bad params: the message names the file and the dotted key."""

    def __init__(self, path: Path | str, key: str, problem: str):
        self.path, self.key = str(path), key
        super().__init__(f"{path}: {key}: {problem}")


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KiB; anything near this is a mistake or an attack
MAX_ALIAS_EXPANSIONS = 100_000  # nodes reached again through aliases (a "billion laughs" reaches 10**9)


def _yaml_problem(err: Exception) -> str:
    """One line for a parser error: ruamel's message is several lines (context, snippet, caret)."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_alias_expansions(path: Path, root: Any) -> None:
    """Walk the composed node graph the way construction and our checks see it (aliases followed) and
    refuse it once nodes reached a second time exceed `MAX_ALIAS_EXPANSIONS`: a YAML bomb (or a
    recursive alias) stops here after ~10**5 steps instead of expanding to 10**9 values."""
    seen: set[int] = set()
    expansions = 0
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            expansions += 1
            if expansions > MAX_ALIAS_EXPANSIONS:
                raise ParamsError(path, "<file>", "too many YAML alias expansions (a YAML bomb?)")
        else:
            seen.add(id(node))
        value = node.value
        if isinstance(node, SequenceNode):
            stack.extend(value)
        elif isinstance(node, MappingNode):
            for key, item in value:
                stack.append(key)
                stack.append(item)


_PARSED: dict[tuple[str, int, int, int], Any] = {}  # (path, inode, mtime_ns, size) -> its document


def read_yaml(path: Path) -> Any:
    """The one document of the YAML file `path`, loaded safely: plain tags only, a bounded size and a
    bounded number of alias expansions. Every problem is one `ParamsError` naming the file.

    A stage reads the same files several times (the section index, each section, the flat params for
    MLflow): each version of a file is parsed once per process and callers get their own copy."""
    if not path.is_file():
        raise ParamsError(path, "<file>", "no such params file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        _PARSED[key] = _parse_yaml(path)
    return copy.deepcopy(_PARSED[key])


def _parse_yaml(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(path, "<file>", f"params file too large ({size} bytes, limit {MAX_PARAMS_BYTES})")
    with open(path, "rb") as f:
        raw = f.read(MAX_PARAMS_BYTES + 1)  # the file may have grown since stat
    if len(raw) > MAX_PARAMS_BYTES:
        raise ParamsError(path, "<file>", f"params file too large (over {MAX_PARAMS_BYTES} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError(path, "<file>", f"not valid YAML: not UTF-8 text ({err.reason} at byte {err.start})") from err
    yaml = YAML(typ="safe", pure=True)
    try:
        node = yaml.compose(text)
    except Exception as err:  # ruamel raises many parser error types; all mean the same here
        raise ParamsError(path, "<file>", f"not valid YAML: {_yaml_problem(err)}") from err
    if node is None:
        return None
    _check_alias_expansions(path, node)
    try:
        return yaml.constructor.construct_document(node)
    except Exception as err:  # unknown tags (`!!python/object:...`), duplicate keys, bad timestamps ...
        raise ParamsError(path, "<file>", f"not valid YAML: {_yaml_problem(err)}") from err


class _NonFinite(ParamsError):
    """A NaN or infinite float: YAML spells them `.nan`, `.inf`, `-.inf`; no params value may be one."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, path: Path, key: str) -> Any:
    """Return `value` if it is of type `tp` (int widened to float), else raise naming `key`."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or type(value) is not type(next(c for c in choices if c == value)):
            raise ParamsError(path, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _check_value(value, option, path, key)
            except _NonFinite:
                raise  # a float where a float is allowed: "not finite" says more than "expected float | None"
            except ParamsError:
                continue
        raise ParamsError(path, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ParamsError(path, key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_type, *_) = get_args(tp) or (Any,)
        return [_check_value(v, item_type, path, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(path, key, f"expected a mapping, got {type(value).__name__}")
        _, item_type = get_args(tp)
        return {k: _check_value(v, item_type, path, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ParamsError(path, key, f"expected null, got {value!r}")
        return None
    if tp is float and type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise _NonFinite(path, key, f"must be a finite number, got an int of {len(str(value))} digits") from None
    if type(value) is not tp:
        raise ParamsError(path, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise _NonFinite(path, key, f"must be a finite number, got {value!r}")
    return value


def section_from_dict(cls: type[T], data: Any, path: Path, section: str, derived: dict[str, Any] | None = None) -> T:
    """Build dataclass `cls` from the mapping `data` found at `path`:`section`, strictly.

    `derived` fields come from the data, not from params (a language model's `vocab_size`): the YAML must
    not set them and they are filled in from `derived`.
    """
    if not isinstance(data, dict):
        raise ParamsError(path, section, f"expected a mapping, got {type(data).__name__}")
    derived = derived or {}
    hints = typing.get_type_hints(cls)
    for name in derived:
        if name in data:
            raise ParamsError(path, f"{section}.{name}", "is set from the data; remove it from params")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in derived}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(path, f"{section}.{unknown[0]}", f"unknown key (known: {', '.join(fields)})")
    missing = [name for name in fields if name not in data]
    if missing:
        raise ParamsError(path, f"{section}.{missing[0]}", "missing key")
    values = {name: _check_value(data[name], hints[name], path, f"{section}.{name}") for name in fields}
    try:
        return cls(**values, **derived)
    except (ValueError, TypeError) as err:
        # __post_init__ validation names the field; prefix the file and section.
        raise ParamsError(path, section, str(err)) from err


def load_params_file(
    path: Path, sections: dict[str, type], derived: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Every section of one params file, each as its dataclass. The file must hold exactly `sections`;
    `derived[section]` fills a section's data-derived fields (see `section_from_dict`)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ParamsError(path, "<file>", "expected a mapping of sections")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ParamsError(path, unknown[0], f"unknown section (known: {', '.join(sections)})")
    missing = [s for s in sections if s not in data]
    if missing:
        raise ParamsError(path, missing[0], "missing section")
    derived = derived or {}
    return {name: section_from_dict(cls, data[name], path, name, derived.get(name)) for name, cls in sections.items()}


def params_files(params_dir: Path) -> list[Path]:
    """The params files (`params/*.yaml`; profiles live below, in `params/profiles/`)."""
    return sorted(params_dir.glob("*.yaml"))


def section_index(params_dir: Path) -> dict[str, Path]:
    """Section name -> the params file that holds it. A name in two files is an error naming both."""
    index: dict[str, Path] = {}
    for path in params_files(params_dir):
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ParamsError(path, "<file>", "expected a mapping of sections")
        for section in data:
            if section in index:
                raise ParamsError(path, section, f"section also defined in {index[section]}; names must be unique")
            index[section] = path
    return index


def load_section(
    params_dir: Path,
    section: str,
    cls: type[T],
    derived: dict[str, Any] | None = None,
    index: dict[str, Path] | None = None,
) -> T:
    """One section as its dataclass `cls`, strictly; `derived` fills its data-derived fields."""
    index = section_index(params_dir) if index is None else index
    if section not in index:
        raise ParamsError(params_dir, section, f"no params file has this section (sections: {', '.join(index)})")
    path = index[section]
    return section_from_dict(cls, read_yaml(path)[section], path, section, derived)


def as_flat_dict(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"ngram.order": 5, ...}`: a config dataclass flattened with dotted keys (for MLflow params)."""
    flat: dict[str, Any] = {}
    for name, value in dataclasses.asdict(config).items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# ----------------------------------------------------------------------------------- profiles


def profile_overlay(profiles_dir: Path, name: str) -> dict[str, dict[str, dict[str, Any]]]:
    path = profiles_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in profiles_dir.glob("*.yaml"))
        raise ParamsError(path, "<file>", f"no profile {name!r} (known: {', '.join(known)})")
    overlay = read_yaml(path)
    if not isinstance(overlay, dict):
        raise ParamsError(path, "<file>", "expected a mapping file -> section -> key -> value")
    for file, sections in overlay.items():
        if not isinstance(sections, dict) or not all(isinstance(s, dict) for s in sections.values()):
            raise ParamsError(path, str(file), "expected a mapping section -> key -> value")
    return overlay


def overlay_keys(overlay: dict[str, dict[str, dict[str, Any]]]) -> set[tuple[str, str, str]]:
    return {(f, s, k) for f, sections in overlay.items() for s, keys in sections.items() for k in keys}


def _keep_style(old: Any, value: Any) -> Any:
    """A list replacing a `[a, b]` list (or a `[]`, whose style ruamel does not record) stays on one line, so
    switching back restores the file exactly."""
    if isinstance(value, list) and isinstance(old, CommentedSeq):
        seq = CommentedSeq(value)
        if old.fa.flow_style() or not old:
            seq.fa.set_flow_style()
        return seq
    return value


def apply_profile(params_dir: Path, name: str) -> list[str]:
    """Rewrite `params_dir/*.yaml` with profile `name`'s values; return the dotted keys that changed."""
    overlay = profile_overlay(params_dir / "profiles", name)
    yaml = YAML()  # round-trip: keeps comments and key order
    yaml.preserve_quotes = True
    yaml.width = 4096
    changed: list[str] = []
    for file, sections in overlay.items():
        path = params_dir / file
        if not path.is_file():
            raise ParamsError(params_dir / "profiles" / f"{name}.yaml", file, "names a params file that does not exist")
        document = yaml.load(path.read_text(encoding="utf-8"))
        for section, keys in sections.items():
            if section not in document:
                raise ParamsError(path, section, f"profile {name!r} sets a section the file does not have")
            for key, value in keys.items():
                if key not in document[section]:
                    raise ParamsError(path, f"{section}.{key}", f"profile {name!r} sets a key the file does not have")
                if document[section][key] != value:
                    document[section][key] = _keep_style(document[section][key], value)
                    changed.append(f"{file}:{section}.{key}")
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as out:
                yaml.dump(document, out)
    return changed
