"""The vit_scratch and dead_rates claims (configs/experiment/{vit_scratch,dead_rates}*.yaml,
their parts of ``ddc_bench.paper``): every scale composes, the designs keep what their
claims depend on, and the table's numbers come with their statistics."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ddc_bench import paper, train
from ddc_bench.config import validate
from test_paper import _compose   # one way to compose an experiment in the tests

CLAIMS = ("vit_scratch", "dead_rates")


@pytest.mark.parametrize("scale", ["cpu", "gpu_short", "paper"])
@pytest.mark.parametrize("experiment", CLAIMS)
def test_designs_keep_what_the_claim_depends_on(experiment, scale):
    cfg, choices, sweep = _compose([f"experiment={experiment}", f"scale={scale}"])
    validate(cfg, choices)
    assert cfg.results_dir == f"results/paper-runs/{experiment}/{scale}"
    assert len(sweep["seed"].split(",")) >= 3  # a 95% interval over seeds
    assert len(sweep["lr_mult"].split(",")) >= 3
    assert cfg.diagnostics.every > 0
    # the weight-decay horizon wd x lr x steps of the paper design (~1.0) at every scale
    steps = cfg.steps if cfg.steps is not None else 9800 if experiment == "vit_scratch" else 10000
    assert cfg.optimizer.weight_decay * 1e-3 * steps == pytest.approx(1.0, rel=0.03)
    if experiment == "vit_scratch":
        assert cfg.task.model.mlp == "relu" and cfg.task.model.mlp_ratio == 8.0
        assert cfg.task.data.eval_examples is not None  # what the table states is what was used
        assert "target" not in cfg.task or cfg.task.target.value is None
    else:
        # ReLU units: the kind the read rule's predicted order holds for (dead_rates.yaml)
        assert cfg.task.model.mlp == "relu" and cfg.diagnostics.probe_batch >= 8
        assert (cfg.steps or 10000) // cfg.diagnostics.every >= 10  # a trajectory to fit


def test_cpu_vit_design_uses_real_mnist():
    cfg, _, _ = _compose(["experiment=vit_scratch"])
    assert cfg.task.data.dataset == "mnist" and cfg.task.data.eval_examples == 1000
    assert 28 % cfg.task.model.patch == 0


@pytest.mark.parametrize("experiment", CLAIMS)
def test_gpu_short_design_runs_a_few_steps_at_tiny_size(experiment, tmp_path):
    """The gpu_short design on the cpu, shrunk to a few steps of a tiny model (its data
    swapped for the bundled mnist where CIFAR is absent)."""
    overrides = [f"experiment={experiment}", "scale=gpu_short", "optimizer=ddc", "steps=4",
                 "eval_every=4", "log_every=2", "diagnostics.every=2", "hardware=cpu",
                 "progress=false", f"results_dir={tmp_path}", "task.model.depth=1",
                 "task.model.width=32", "task.batch_size=8"]
    if experiment == "vit_scratch":
        overrides += ["task.data.dataset=mnist", "task.model.patch=7", "task.data.eval_examples=64",
                      "task.model.heads=2"]
    else:
        overrides += ["task.model.context=32", "task.data.eval_examples=8", "task.model.heads=2"]
    cfg, choices, _ = _compose(overrides)
    validate(cfg, choices)
    summary = train.run(cfg, overrides=overrides)
    assert summary["status"] == "finished" and summary["steps_done"] == 4
    assert summary["diagnostics"]["diag/checkpoints"] == 2
    if experiment == "vit_scratch":
        assert "diag/ablate/tail_dloss" in summary["diagnostics"]


def _row(opt, seed, lr_mult=1.0, selected=True, **values):
    base = {"optimizer": opt, "lr": 1e-3 * lr_mult, "lr_mult": lr_mult, "seed": seed,
            "variant": "v", "selected": selected, "diverged": False, "steps": 100,
            "steps_done": 100, "val_loss": math.nan}
    return {**base, **values}


def test_vit_number_and_comparison_on_fabricated_runs():
    claim = paper.CLAIM_BY_NAME["vit_scratch"]
    runs = pd.DataFrame(
        [_row("ddc", s, val_loss=v, eff_units_frac=e, ablate_tail_dloss=0.001, ablate_tail_frac=0.5,
              spare_frac=0.4) for s, v, e in ((0, 0.30, 0.4), (1, 0.32, 0.5), (2, 0.31, 0.45))]
        + [_row("adamw", s, val_loss=v, eff_units_frac=0.9, ablate_tail_dloss=0.05,
                ablate_tail_frac=0.1, spare_frac=0.0) for s, v in ((0, 0.40), (1, 0.41), (2, 0.42))]
        + [_row("ddc", 0, lr_mult=2.0, selected=False, val_loss=0.5, eff_units_frac=0.3,
                ablate_tail_dloss=0.0, ablate_tail_frac=0.6, spare_frac=0.5),
           _row("adamw", 0, lr_mult=2.0, selected=False, val_loss=0.45, eff_units_frac=0.9,
                ablate_tail_dloss=0.0, ablate_tail_frac=0.1, spare_frac=0.0)])
    text = paper.our_number(claim, runs)
    # 95% t-interval of (0.30, 0.32, 0.31): 0.31 ± 4.303 x 0.01 / sqrt(3)
    assert "DDC-Adam val loss 0.310 [0.285, 0.335] (n=3)" in text
    assert "AdamW val loss 0.410 [0.385, 0.435] (n=3)" in text
    assert "val loss diff -0.100" in text and "Hedges g=" in text and "Welch p=" in text
    assert "matched lr_mult: x1 -0.100, x2 +0.050" in text


def test_dead_number_and_fisher_test_on_fabricated_runs():
    from scipy.stats import fisher_exact

    claim = paper.CLAIM_BY_NAME["dead_rates"]
    runs = pd.DataFrame(
        [_row("ddc", s, cells_read=r, cells_total=t, units=352.0)
         for s, r, t in ((0, 10, 20), (1, 12, 22), (2, 10, 23))]
        + [_row("adamw", s, cells_read=r, cells_total=t, units=352.0)
           for s, r, t in ((0, 2, 20), (1, 3, 21), (2, 2, 24))]
        + [_row("adamw", 0, lr_mult=2.0, selected=False, cells_read=0, cells_total=0, units=352.0)])
    text = paper.our_number(claim, runs)
    assert "DDC-Adam 32 of 65 cells read = 0.49" in text and "20, 22, 23 per seed" in text
    assert "AdamW 7 of 65 cells read = 0.11" in text and "of 352 units per run" in text
    p = fisher_exact([[32, 33], [7, 58]], alternative="greater").pvalue
    assert f"one-sided Fisher p={p:.2g}" in text
    assert "AdamW x1 7/65, x2 0/0" in text


def test_dead_comparison_without_cells_says_so():
    claim = paper.CLAIM_BY_NAME["dead_rates"]
    runs = pd.DataFrame([_row(o, s, cells_read=0.0, cells_total=0.0, units=352.0)
                         for o in ("ddc", "adamw") for s in range(3)])
    assert "Fisher test: not defined (an optimizer has no cell)" in paper.our_number(claim, runs)


def test_claim_columns_and_selection_metric():
    summary = {"diagnostics": {"diag/cells_read": 3.0, "diag/cells_total": 5.0, "diag/units": 9.0}}
    cols = paper.claim_columns("dead_rates", summary)
    assert cols["cells_read"] == 3.0 and cols["units"] == 9.0 and math.isnan(cols["checkpoints"])
    assert math.isnan(paper.claim_columns("vit_scratch", {})["ablate_tail_dloss"])
    assert paper.CLAIM_SELECTION == {"vit_scratch": "val_loss", "dead_rates": "val_loss"}
    assert "evaluation used 1000 validation images" in paper.vit_data_text(
        {"dataset": "mnist", "image": "1x28x28", "train_size": 4000, "val_size": 1000,
         "eval_examples": 1000})
