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
    """Relations the rows must satisfy (no timing is compared: two measured times say
    nothing about the code)."""
    by_name = {(r["task"], r["optimizer"]): r for r in steps}
    for r in steps:
        ref = by_name[(r["task"], "adamw_foreach")]
        assert float(r["step_ms_vs_ref"]) == pytest.approx(float(r["step_ms"]) / float(ref["step_ms"]))
        assert float(r["state_bytes_vs_ref"]) == pytest.approx(
            int(r["state_bytes"]) / int(ref["state_bytes"]))
        assert r["peak_mib"] != "" and float(r["step_syncs"]) == 0.0  # the CPU never waits
        assert f"| {r['task']}-{r['size']}" in report and f"| {r['optimizer']} " in report
        if r["optimizer"] == "adamw_foreach":
            # exp_avg and exp_avg_sq (float32) per parameter, one float32 step per tensor
            params, tensors = int(r["params"]), int(r["param_tensors"])
            assert int(r["state_bytes"]) == 8 * params + 4 * tensors
        base = {"ddc": "adamw_foreach", "ddc_muon": "muon"}.get(r["optimizer"])
        if base is not None and (r["task"], base) in by_name:
            assert r["base"] == base and float(r["step_vs_base"]) == pytest.approx(
                float(r["step_ms"]) / float(by_name[(r["task"], base)]["step_ms"]))


def test_op_counter_counts_operators_scalar_reads_and_no_cpu_syncs():
    from ddc_bench.perf.ops import count_step

    x = torch.randn(5)
    counter = count_step(lambda: (x.add_(1), torch._foreach_mul_([x, x], 2.0), x.sum().item()))
    assert dict(counter.ops) == {"aten.add_": 1, "aten._foreach_mul_": 1, "aten.sum": 1,
                                 "aten._local_scalar_dense": 1}
    assert counter.total == 4 and counter.scalar_reads == 1 and counter.syncs == 0


def test_perf_counts_the_operators_of_the_reference_step(tmp_path, restore_threads):
    """The adamw_foreach row's operator count is what one foreach AdamW step dispatches on
    the same model, counted here independently."""
    from ddc_bench.perf.ops import count_step
    from ddc_bench.perf.setup import build_named_optimizer, build_task_or_fail, task_config

    out = tmp_path / "perf"
    perf.main(["--tasks", "grok_modadd", "--size", "tiny", "--optimizers", "adamw", "--steps", "1",
               "--warmup", "0", "--overhead-steps", "0", "--no-scaling", "--out", str(out)])
    row = {r["optimizer"]: r for r in _rows(out / "steps.csv")}["adamw_foreach"]
    model = build_task_or_fail(task_config("grok_modadd", "tiny")).build_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer = build_named_optimizer("adamw_foreach", model)  # adamw.yaml's, two groups
    optimizer.step()  # the state exists, as after the timed steps
    counter = count_step(optimizer.step)
    assert float(row["step_ops"]) == counter.total
    assert float(row["step_scalar_reads"]) == counter.scalar_reads


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
