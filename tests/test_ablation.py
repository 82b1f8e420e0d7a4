"""benchmarks/ablation.py: variants run through the bundle CLI, their table, resumption and the errors it names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablation  # noqa: E402

# A stand-in bundle: its "training" writes the validation report a real training writes (a Dice of
# 100 * learning_rate, and a floor), or fails when the learning rate is 0, so the test runs the real CLI in seconds.
TRAIN_YAML = """
output_dir: /nonexistent
model_dir: /nonexistent
learning_rate: 0.5
imports: ["$import json", "$import pathlib"]
report_dir: "$pathlib.Path(@output_dir) / 'validation'"
summary: {mean_dice: "$100 / (1 / @learning_rate)", floor: {mean_dice: 1.5}}
training:
- "$@report_dir.mkdir(parents=True, exist_ok=True)"
- "$(@report_dir / 'report.json').write_text(json.dumps({'summary': @summary}))"
"""


@pytest.fixture()
def fake_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.yaml").write_text(TRAIN_YAML)
    return bundle


def test_variants_train_tabulate_and_are_not_rerun(fake_bundle: Path, tmp_path: Path) -> None:
    variants = tmp_path / "variants.yaml"
    variants.write_text("default: {}\nlow_lr: {learning_rate: 0.25}\n")
    out = tmp_path / "out"
    assert ablation.main(["--bundle", str(fake_bundle), "--variants", str(variants), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| default | (defaults) | 50.00 |" in table, table
    assert "| low_lr | learning_rate=0.25 | 25.00 |" in table, table
    assert "| floor (training split) | | 1.50 | |" in table, table
    record = json.loads((out / "low_lr" / "ablation_run.json").read_text())
    assert record["summary"]["mean_dice"] == 25.0

    # a finished variant is read back, not retrained: its report is removed and the table still holds it
    (out / "default" / "validation" / "report.json").write_text("{}")
    ablation.main(["--bundle", str(fake_bundle), "--variants", str(variants), "--out", str(out)])
    assert "| default | (defaults) | 50.00 |" in (out / "table.md").read_text()


def test_a_failed_variant_names_its_log(fake_bundle: Path, tmp_path: Path) -> None:
    variants = tmp_path / "variants.yaml"
    variants.write_text("broken: {learning_rate: 0}\n")
    with pytest.raises(RuntimeError, match=r"variant 'broken': the training exited with status [1-9].*ablation_log"):
        ablation.main(["--bundle", str(fake_bundle), "--variants", str(variants), "--out", str(tmp_path / "out")])
    assert "ZeroDivisionError" in (tmp_path / "out" / "broken" / "ablation_log.txt").read_text()


@pytest.mark.parametrize(
    "text, extra, message",
    [
        ("- a\n- b\n", [], "expected a mapping of variant names"),
        ("a: 3\n", [], "variant 'a' must map to overrides"),
        ("a: {output_dir: /x}\n", [], "variant 'a' sets \\['output_dir'\\]"),
        ("a: {}\n", ["--set", "epochs"], "--set takes KEY=VALUE"),
        ("a: {}\n", ["--set", "model_dir=/x"], "the command sets 'model_dir' itself"),
        ("a: {}\n", ["--only", "b"], "--only \\['b'\\]: not in"),
    ],
)
def test_bad_arguments_are_named_before_anything_runs(
    fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, text: str, extra: list[str], message: str
) -> None:
    variants = tmp_path / "variants.yaml"
    variants.write_text(text)
    with pytest.raises(SystemExit) as stop:
        ablation.main(["--bundle", str(fake_bundle), "--variants", str(variants), "--out", str(tmp_path / "o"), *extra])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()
