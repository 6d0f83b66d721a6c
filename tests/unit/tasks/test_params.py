"""The strict params loader, the committed params files and the profiles."""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from ruamel.yaml import YAML

from flows.registry import load_all, section_config, section_types
from tasks.params import (
    MAX_PARAMS_BYTES,
    ParamsError,
    apply_profile,
    load_params_file,
    overlay_keys,
    params_files,
    profile_overlay,
    read_yaml,
    section_index,
)


@dataclass(frozen=True)
class Example:
    name: str
    steps: int
    lr: float
    kind: Literal["a", "b"]
    widths: list[int]
    flag: bool

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


GOOD = "ex:\n  name: x\n  steps: 3\n  lr: 0.1\n  kind: a\n  widths: [1, 2]\n  flag: true\n"


def load(tmp_path: Path, text: str):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    return load_params_file(path, {"ex": Example})["ex"]


def test_good_file_loads_with_exact_types(tmp_path):
    ex = load(tmp_path, GOOD)
    assert ex == Example("x", 3, 0.1, "a", [1, 2], True)


def test_int_widens_to_float_but_nothing_else_is_coerced(tmp_path):
    assert load(tmp_path, GOOD.replace("lr: 0.1", "lr: 1")).lr == 1.0
    assert isinstance(load(tmp_path, GOOD.replace("lr: 0.1", "lr: 1")).lr, float)


@pytest.mark.parametrize(
    "edit, key, words",
    [
        (("steps: 3", "steps: 3\n  stepz: 4"), "ex.stepz", "unknown key"),
        (("  steps: 3\n", ""), "ex.steps", "missing key"),
        (("steps: 3", "steps: '3'"), "ex.steps", "expected int"),
        (("steps: 3", "steps: 3.0"), "ex.steps", "expected int"),
        (("steps: 3", "steps: true"), "ex.steps", "expected int"),
        (("lr: 0.1", "lr: fast"), "ex.lr", "expected float"),
        (("kind: a", "kind: c"), "ex.kind", "must be one of"),
        (("widths: [1, 2]", "widths: [1, two]"), "ex.widths[1]", "expected int"),
        (("widths: [1, 2]", "widths: 3"), "ex.widths", "expected a list"),
        (("flag: true", "flag: 1"), "ex.flag", "expected bool"),
        (("steps: 3", "steps: 0"), "ex", "steps must be >= 1"),
    ],
)
def test_errors_name_file_and_dotted_key(tmp_path, edit, key, words):
    with pytest.raises(ParamsError) as err:
        load(tmp_path, GOOD.replace(*edit))
    assert err.value.key == key
    assert str(tmp_path / "example.yaml") in str(err.value)
    assert words in str(err.value)


def test_unknown_and_missing_sections_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="exx: unknown section"):
        load(tmp_path, GOOD + "exx:\n  a: 1\n")
    with pytest.raises(ParamsError, match="ex: missing section"):
        load(tmp_path, "{}\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load(tmp_path, "ex: [unclosed\n")


def test_committed_params_load_and_sections_are_unique(repo_root):
    configs = load_all(repo_root / "params")
    # every section of every file is read by some stage spec (or is the runtime), each with one class
    assert set(configs) == set(section_index(repo_root / "params")) == set(section_types())


def test_a_section_in_two_files_is_an_error(tmp_path, repo_root):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    (params / "extra.yaml").write_text("ngram:\n  order: 3\n")
    with pytest.raises(ParamsError, match="ngram: section also defined in"):
        section_index(params)


def test_a_section_no_stage_reads_is_an_error(tmp_path, repo_root):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    lm = params / "lm.yaml"
    lm.write_text(lm.read_text() + "\nngarm:\n  order: 3\n")
    with pytest.raises(ParamsError, match="ngarm: no stage spec reads this section"):
        load_all(params)


def test_real_section_error_names_file_and_key(tmp_path, repo_root):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    lm = params / "lm.yaml"
    lm.write_text(lm.read_text().replace("order: 5", "order: 0"))
    with pytest.raises(ParamsError) as err:
        section_config(params, "ngram")
    assert "lm.yaml" in str(err.value) and "ngram" in str(err.value) and "order" in str(err.value)


def test_profiles_name_the_same_keys(repo_root):
    profiles = repo_root / "params" / "profiles"
    keys = {p.stem: overlay_keys(profile_overlay(profiles, p.stem)) for p in profiles.glob("*.yaml")}
    assert set(keys) == {"smoke", "default", "gpu"}
    assert keys["smoke"] == keys["default"] == keys["gpu"]


def test_committed_params_are_the_default_profile(tmp_path, repo_root):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    assert apply_profile(params, "default") == []


@pytest.mark.parametrize("profile", ["smoke", "gpu"])
def test_every_profile_applies_loads_and_switches_back_exactly(tmp_path, repo_root, profile):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    before = {f: f.read_text() for f in params_files(params)}
    changed = apply_profile(params, profile)
    assert changed, "a profile should differ from default"
    configs = load_all(params)
    assert configs["runtime"].profile == profile
    overlay = profile_overlay(params / "profiles", profile)
    for file, sections in overlay.items():
        data = YAML(typ="safe").load((params / file).read_text())
        for section, keys in sections.items():
            for key, value in keys.items():
                assert data[section][key] == value
    assert sorted(apply_profile(params, "default")) == sorted(changed)
    assert {f: f.read_text() for f in params_files(params)} == before  # comments and layout survive


def test_unknown_profile_is_a_clear_error(tmp_path, repo_root):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    with pytest.raises(ParamsError, match="no profile 'huge'"):
        apply_profile(params, "huge")


# ------------------------------------------------------------------------------ hardening


@pytest.mark.parametrize("spelling, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e400", "inf")])
def test_non_finite_float_is_an_error_naming_file_and_key(tmp_path, spelling, shown):
    with pytest.raises(ParamsError) as err:
        load(tmp_path, GOOD.replace("lr: 0.1", f"lr: {spelling}"))
    assert err.value.key == "ex.lr"
    assert str(tmp_path / "example.yaml") in str(err.value)
    assert f"must be a finite number, got {shown}" in str(err.value)


def test_non_finite_float_inside_optional_and_mapping_fields(tmp_path):
    @dataclass(frozen=True)
    class Nested:
        scale: float | None
        weights: dict[str, float]

    path = tmp_path / "nested.yaml"
    path.write_text("n:\n  scale: .inf\n  weights: {a: 1.0}\n")
    with pytest.raises(ParamsError, match=r"n\.scale: must be a finite number, got inf"):
        load_params_file(path, {"n": Nested})
    path.write_text("n:\n  scale: null\n  weights: {a: 1.0, b: .nan}\n")
    with pytest.raises(ParamsError, match=r"n\.weights\.b: must be a finite number, got nan"):
        load_params_file(path, {"n": Nested})


@pytest.mark.parametrize("bad, shown", [(".nan", "nan"), (".inf", "inf")])
def test_non_finite_float_in_a_real_list_section(tmp_path, repo_root, bad, shown):
    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    images = params / "images.yaml"
    text = images.read_text()
    assert "cfg_scales: [0.0, 1.0, 2.0, 4.0]" in text
    images.write_text(text.replace("cfg_scales: [0.0, 1.0, 2.0, 4.0]", f"cfg_scales: [0.0, {bad}, 2.0, 4.0]"))
    with pytest.raises(ParamsError) as err:
        section_config(params, "guidance")
    assert err.value.key == "guidance.cfg_scales[1]"
    assert err.value.path == str(images)
    assert f"must be a finite number, got {shown}" in str(err.value)


def test_a_file_over_the_size_bound_is_refused_before_parsing(tmp_path):
    path = tmp_path / "example.yaml"
    # valid YAML, so only the bound can refuse it
    path.write_text(GOOD + "# " + "x" * (MAX_PARAMS_BYTES + 10) + "\n")
    size = path.stat().st_size
    with pytest.raises(ParamsError) as err:
        read_yaml(path)
    assert err.value.key == "<file>"
    assert f"params file too large ({size} bytes, limit {MAX_PARAMS_BYTES})" in str(err.value)
    path.write_text(GOOD + "# " + "x" * (MAX_PARAMS_BYTES - len(GOOD) - 100) + "\n")  # just under: loads
    assert read_yaml(path)["ex"]["steps"] == 3


def billion_laughs(levels: int = 9) -> str:
    names = "abcdefghijklmnop"[:levels]
    lines = [f'{names[0]}: &{names[0]} ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [billion_laughs(), "a: &x [*x, *x]\n"], ids=["billion-laughs", "recursive"])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, text):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ParamsError) as err:
        read_yaml(path)
    assert time.perf_counter() - start < 2.0
    assert err.value.key == "<file>"
    assert "too many YAML alias expansions (a YAML bomb?)" in str(err.value)


def test_a_few_aliases_are_fine(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text("base: &b [1, 2]\nex:\n  widths: *b\n  more: *b\n")
    assert read_yaml(path) == {"base": [1, 2], "ex": {"widths": [1, 2], "more": [1, 2]}}


def test_python_tag_is_one_clean_error(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text("ex: !!python/object:os.system\n  name: x\n")
    with pytest.raises(ParamsError) as err:
        read_yaml(path)
    message = str(err.value)
    assert err.value.key == "<file>"
    assert message.startswith(f"{path}: <file>: not valid YAML: ")
    assert "python/object:os.system" in message and "(line 1, column 5)" in message
    assert "\n" not in message


def test_syntax_error_is_one_line_with_its_position(tmp_path):
    with pytest.raises(ParamsError) as err:
        load(tmp_path, "ex: [unclosed\n")
    assert "\n" not in str(err.value)
    assert "(line 2, column 1)" in str(err.value)


def test_read_yaml_parses_each_version_once_and_hands_out_copies(tmp_path):
    import os

    from tasks import params

    path = tmp_path / "lm.yaml"
    path.write_text("ngram:\n  order: 3\n")
    first = params.read_yaml(path)
    first["ngram"]["order"] = 99  # a caller's edit must not reach the next caller
    assert params.read_yaml(path) == {"ngram": {"order": 3}}
    parsed = len(params._PARSED)
    params.read_yaml(path)
    assert len(params._PARSED) == parsed  # same version: not parsed again
    stat = path.stat()
    path.write_text("ngram:\n  order: 44\n")  # an edit: a new mtime and size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime, the size differs
    assert params.read_yaml(path) == {"ngram": {"order": 44}}
