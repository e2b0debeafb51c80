"""Dead-direction diagnostics during training (``diagnostics.every``), the report's plot of
them, and ``task.data.train_bytes`` of gpt_lm (the over-training experiment's small text)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose

from ddc_bench import results, train
from ddc_bench.config import ConfigError, validate
from ddc_bench.diagnose import DiagnosticsHook


def _run(tmp_path, *extra):
    overrides = ["task=gpt_lm", "task.size=tiny", "optimizer=ddc", "hardware=cpu", "steps=6",
                 "log_every=2", "eval_every=3", f"results_dir={tmp_path}", "progress=false",
                 *extra]
    cfg, choices = compose(overrides)
    validate(cfg, choices)
    summary = train.run(cfg, overrides=overrides)
    folder = results.run_dir(tmp_path, "gpt_lm", "tiny", "ddc", summary["variant"], 0)
    return summary, results.read_metrics(folder)


def test_readings_land_in_metrics_and_summary_and_do_not_change_training(tmp_path):
    off, off_records = _run(tmp_path / "off")
    on, records = _run(tmp_path / "on", "diagnostics.every=4")
    # Read at the first record at or after step 4 (the training line) and at the last step,
    # once per step even where an evaluation record shares the step.
    read = [r["step"] for r in records if "diag/cells_read" in r]
    assert read == [4, 6]
    assert all("loss" in r for r in records if "diag/cells_read" in r)
    last = [r for r in records if "diag/cells_read" in r][-1]
    assert on["diagnostics"]["step"] == 6
    assert {k: v for k, v in on["diagnostics"].items() if k != "step"} == \
        {k: v for k, v in last.items() if k.startswith("diag/")}
    assert on["diagnostics"]["diag/checkpoints"] == 2  # the trajectory: steps 4 and 6
    assert on["diagnostics"]["diag/units"] == 2 * 88  # gpt_lm tiny: 2 SwiGLU layers x 88 units
    assert not any(k.startswith("diag/") for k in (*on["final"], *on["best"]))
    # Off by default; the same variant folder; identical training (a forked RNG, no writes).
    assert off["diagnostics"] is None and on["variant"] == off["variant"]
    assert not any("diag/cells_read" in r for r in off_records)
    strip = [{k: v for k, v in r.items() if not k.startswith("diag/")
              and k not in ("train_time_s", "units_per_s")} for r in records]
    assert strip == [{k: v for k, v in r.items() if k not in ("train_time_s", "units_per_s")}
                     for r in off_records]


def test_report_plots_diagnostics_when_logged(tmp_path):
    from ddc_bench.report import build_report

    _run(tmp_path, "diagnostics.every=3")
    written = build_report(tmp_path)
    assert any(name.endswith("_diagnostics.png") for name in map(str, written))
    plot = tmp_path / "plots" / "gpt_lm-tiny_diagnostics.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dead-direction diagnostics" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("diagnostics.every=-1", "diagnostics.every"),
    ("diagnostics.probe_batch=0", "diagnostics.probe_batch"),
    ("diagnostics.every=often", "diagnostics.every"),
])
def test_bad_diagnostics_values_are_one_line_errors(override, message):
    cfg, choices = compose([override])
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg, choices)
    assert "\n" not in str(err.value)


def test_hook_schedule_after_a_resume(monkeypatch):
    import ddc.diagnostics

    read = []
    monkeypatch.setattr(ddc.diagnostics, "diagnostics", lambda model, probe, **kw: {"diag/x": 1.0})
    hook = DiagnosticsHook(100, (torch.zeros(1, 1), torch.zeros(1)), total=1000, start=500)
    for step in (510, 600, 600, 650, 1000):
        record: dict = {}
        hook(SimpleNamespace(model=None), step, record)
        read.append("diag/x" in record)
    # 500 was read before the interruption; 600 once (two records), the last step always.
    assert read == [False, True, False, False, True]
    assert hook.last == {"step": 1000.0, "diag/x": 1.0}


def test_train_bytes_keeps_a_prefix_of_the_training_text_only():
    from tasks import build_task

    full = build_task({"name": "gpt_lm", "size": "tiny"})
    small = build_task({"name": "gpt_lm", "size": "tiny", "data": {"train_bytes": 4096}})
    assert len(small.train_data) == 4096
    assert torch.equal(small.train_data, full.train_data[:4096])
    assert torch.equal(small.val_data, full.val_data)  # validation unchanged
    assert small.describe()["data"]["train_bytes"] == 4096
    batch = next(iter(small.train_batches(0)))
    assert batch[0].shape == (8, 32)
    with pytest.raises(ValueError, match="train_bytes must be a positive int"):
        build_task({"name": "gpt_lm", "size": "tiny", "data": {"train_bytes": 0}})
    with pytest.raises(ValueError, match="fewer than one window"):
        build_task({"name": "gpt_lm", "size": "tiny", "data": {"train_bytes": 20}})


def test_summary_json_has_the_diagnostics_field(tmp_path):
    _run(tmp_path, "diagnostics.every=6")
    (summary_file,) = tmp_path.rglob(results.SUMMARY_FILE)
    on_disk = json.loads(summary_file.read_text())
    assert set(on_disk) == set(results.Summary.__annotations__)
    assert on_disk["diagnostics"]["step"] == 6
