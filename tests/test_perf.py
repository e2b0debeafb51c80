"""ddc-bench-perf on tiny models with few steps: the files and table rows exist (no timing
is asserted: speed is the benchmark's business, not the tests')."""

from __future__ import annotations

import csv

import pytest
import torch
from cifar_fixture import write_fake_cifar

from ddc_bench import perf


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_perf_writes_tables_plots_and_refuses_to_overwrite(tmp_path, capsys, restore_threads):
    out = tmp_path / "perf"
    argv = ["--tasks", "grok_modadd", "--size", "tiny", "--optimizers", "ddc", "--steps", "2",
            "--warmup", "1", "--overhead-steps", "3", "--overhead-optimizers", "ddc",
            "--scale", "tiny,tiny:width=48", "--scale-task", "grok_modadd", "--profile", "ddc",
            "--out", str(out)]
    perf.main(argv)
    printed = capsys.readouterr().out

    for name in ("report.md", "steps.csv", "steps.png", "scaling.csv", "scaling.png",
                 "overhead.csv", "profile-ddc.txt"):
        assert (out / name).stat().st_size > 0, name
    steps = _rows(out / "steps.csv")
    assert [(r["task"], r["optimizer"]) for r in steps] == [
        ("grok_modadd", "adamw_foreach"), ("grok_modadd", "ddc")]
    _check_step_rows(steps, (out / "report.md").read_text())
    report = (out / "report.md").read_text()
    assert "## Harness overhead" in report and "## Scaling" in report and "## Profile of `ddc`" in report
    scaling = _rows(out / "scaling.csv")
    assert {(r["model"], r["optimizer"]) for r in scaling} == {
        (m, o) for m in ("tiny", "tiny:width=48") for o in ("adamw_foreach", "ddc")}
    widths = {r["model"]: int(r["params"]) for r in scaling}
    assert widths["tiny:width=48"] > widths["tiny"]
    overhead = _rows(out / "overhead.csv")
    assert [r["optimizer"] for r in overhead] == ["ddc"] and "ddc_bench.train.train_step" in overhead[0]["method"]
    assert "adamw_foreach" in printed and "Self CPU" in printed

    # A second run into the same folder stops with one line; nothing is touched.
    before = (out / "report.md").read_bytes()
    with pytest.raises(SystemExit) as exc:
        perf.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddc-bench-perf: error:") and "already exists" in err and "\n" not in err
    assert (out / "report.md").read_bytes() == before


def _check_step_rows(steps, report):
    for r in steps:
        assert float(r["step_ms"]) > 0 and float(r["train_step_ms"]) >= float(r["step_ms"])
        assert int(r["state_bytes"]) > 0 and r["peak_mib"] != ""
        assert f"| {r['task']}-{r['size']}" in report and f"| {r['optimizer']} " in report
        if r["optimizer"] == "ddc":
            assert r["base"] == "adamw_foreach" and float(r["step_vs_base"]) > 0
        if r["optimizer"] == "ddc_muon":
            assert r["base"] == "muon" and float(r["step_vs_base"]) > 0


@pytest.mark.slow
def test_perf_on_every_task_and_the_default_optimizers(tmp_path, restore_threads):
    """CIFAR tasks on fabricated data; every default optimizer; no scaling or overhead."""
    root = write_fake_cifar(tmp_path / "cifar", "cifar10", n_train=40, n_test=10)
    out = tmp_path / "perf"
    perf.main(["--tasks", "all", "--size", "tiny", "--steps", "2", "--warmup", "1",
               "--overhead-steps", "0", "--no-scaling", "--data-root", str(root), "--out", str(out)])
    steps = _rows(out / "steps.csv")
    assert [(r["task"], r["optimizer"]) for r in steps] == [
        (t, o) for t in perf.TASK_NAMES for o in ("adamw_foreach", "adamw", "ddc", "muon", "ddc_muon")]
    _check_step_rows(steps, (out / "report.md").read_text())
    assert not (out / "scaling.csv").exists() and not (out / "overhead.csv").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--optimizers", "adamw,lino"], "unknown optimizer(s) lino; accepted:"),
    (["--tasks", "mnist"], "unknown task(s) mnist; accepted: gpt_lm"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--scale", "huge"], "unknown size 'huge'"),
    (["--scale", "small:width"], "expected SIZE[:KEY=VALUE...]"),
])
def test_perf_bad_input_is_one_line(argv, expected, tmp_path, capsys, restore_threads):
    with pytest.raises(SystemExit) as exc:
        perf.main([*argv, "--out", str(tmp_path / "perf")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddc-bench-perf: error:") and expected in err and "\n" not in err
    assert not (tmp_path / "perf").exists()
