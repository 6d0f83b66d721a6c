"""Reference tests (ours against kenlm, pycocotools, torchmetrics ...) fail under CI when the reference
package is missing, and skip elsewhere."""

import pytest

from tests.conftest import reference

MISSING = "kiln_no_such_reference_package"


def test_missing_reference_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"reference package {MISSING} is missing; CI must install it"):
        reference(MISSING)


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_missing_reference_skips_outside_ci(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=f"reference package {MISSING} is missing"):
        reference(MISSING)


@pytest.mark.parametrize("ci", [None, "true"])
def test_present_reference_is_returned(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    import json

    assert reference("json") is json
    assert reference("json.decoder") is json.decoder
