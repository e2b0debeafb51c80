"""ddc-bench-perf's ``ddc_ref`` / ``ddc_muon_ref`` rows (DDC's reference step,
``foreach=False``) and ``ddc_compiled`` / ``ddc_muon_compiled`` / ``adamw_compiled`` rows
(``torch.compile``d steps), timed side by side with the default ones (no timing is
asserted)."""

from __future__ import annotations

import csv

import pytest
import torch

from ddc import DDC
from ddc_bench import perf


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _step_rows(tmp_path, optimizers, warmup):
    """steps.csv of a step-time-only ddc-bench-perf run on the tiny grokking model, by optimizer."""
    out = tmp_path / "perf"
    perf.main(["--tasks", "grok_modadd", "--size", "tiny", "--optimizers", optimizers, "--steps", "2",
               "--warmup", str(warmup), "--overhead-steps", "0", "--no-scaling", "--out", str(out)])
    with open(out / "steps.csv", newline="") as f:
        return {r["optimizer"]: r for r in csv.DictReader(f)}


def test_reference_variants_build_the_reference_step():
    from tasks.grok_modadd import GrokTransformer

    model = GrokTransformer(vocab=13, num_classes=11, depth=1, width=16, heads=2)
    for name, base in (("ddc_ref", "adam"), ("ddc_muon_ref", "muon")):
        opt = perf.build_named_optimizer(name, model)
        assert isinstance(opt, DDC) and opt.foreach is False and opt.base == base
    assert perf.build_named_optimizer("ddc", model).foreach is True
    for name, base in (("ddc_compiled", "adam"), ("ddc_muon_compiled", "muon")):
        opt = perf.build_named_optimizer(name, model)
        assert isinstance(opt, DDC) and opt.compile is True and opt.foreach is True and opt.base == base
    assert perf.build_named_optimizer("ddc", model).compile is False


@pytest.mark.slow  # ~25 s: a peak-memory process per optimizer
def test_reference_rows_sit_next_to_the_fast_ones(tmp_path, restore_threads):
    rows = _step_rows(tmp_path, "ddc,ddc_ref,muon,ddc_muon_ref", warmup=1)
    assert set(rows) == {"adamw_foreach", "ddc", "ddc_ref", "muon", "ddc_muon_ref"}
    assert rows["ddc_ref"]["base"] == "adamw_foreach" and rows["ddc_muon_ref"]["base"] == "muon"


def test_reference_variants_are_not_runner_optimizers(tmp_path, capsys, restore_threads):
    """The harness-overhead measurement composes ``ddc-bench`` configs, which know only the
    registry's optimizers: a variant there is refused in one line."""
    with pytest.raises(SystemExit):
        perf.main(["--tasks", "grok_modadd", "--size", "tiny", "--overhead-optimizers", "ddc_ref",
                   "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ddc_ref" in err[0] and "accepted" in err[0]


@pytest.mark.slow  # ~1 min: compiling the kernels
def test_compiled_rows_compare_with_compiled_adamw(tmp_path, restore_threads):
    rows = _step_rows(tmp_path, "adamw_compiled,ddc_compiled", warmup=2)
    assert set(rows) == {"adamw_foreach", "adamw_compiled", "ddc_compiled"}
    assert rows["ddc_compiled"]["base"] == "adamw_compiled"
    assert float(rows["ddc_compiled"]["step_ms"]) > 0
