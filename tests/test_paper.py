"""The paper experiments (configs/experiment/{lm_overtrain,vit_scratch,grok_depth,dead_rates})
and ``ddc_bench.paper`` (collect, figures, the README table)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import REPO_ROOT
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ddc_bench import paper, train
from ddc_bench.config import CONFIG_DIR, validate

EXPERIMENTS = [c.name for c in paper.CLAIMS]
PNG = b"\x89PNG\r\n\x1a\n"

#: Few-step overrides that keep each experiment's design but make it tiny and fast.
TINY = {
    "lm_overtrain": ["task.model.depth=1", "task.model.width=32", "task.data.train_bytes=4096"],
    "vit_scratch": ["task.model.depth=1", "task.model.width=32", "task.batch_size=16"],
    "grok_depth": ["task.model.depth=1", "task.model.width=32", "task.data.p=11"],
    "dead_rates": ["task.model.depth=1", "task.model.width=32"],
}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    sweep = OmegaConf.to_container(cfg.hydra.sweeper.params)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices, sweep


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_its_matched_sweep(experiment, scale):
    cfg, choices, sweep = _compose([f"experiment={experiment}", f"scale={scale}"])
    validate(cfg, choices)
    claim = paper.CLAIM_BY_NAME[experiment]
    assert sweep["optimizer"].split(",") == list(claim.optimizers[::-1])  # base, then DDC
    grid = [float(x) for x in sweep["lr_mult"].split(",")]
    assert 1.0 in grid and len(grid) >= 3
    assert len(sweep["seed"].split(",")) >= 2
    assert cfg.results_dir == f"results/paper-runs/{experiment}/{scale}"
    if experiment == "vit_scratch":
        assert cfg.task.model.mlp == "relu"  # GELU has no unit gauge: no spare-capacity reading
    if experiment in ("vit_scratch", "dead_rates"):
        assert cfg.diagnostics.every > 0
    if experiment == "lm_overtrain":
        assert cfg.task.data.train_bytes > 0
    if experiment == "grok_depth" and scale == "paper":
        assert cfg.task.model.depth == 24


def _run_tiny(experiment, optimizer, runs_root, extra=()):
    overrides = [f"experiment={experiment}", f"optimizer={optimizer}", "steps=3",
                 "eval_every=3", "log_every=1", "hardware=cpu", "progress=false",
                 f"results_dir={runs_root / experiment / 'cpu'}", *TINY[experiment], *extra]
    if experiment in ("vit_scratch", "dead_rates"):
        overrides.append("diagnostics.every=2")
    cfg, choices, _ = _compose(overrides)
    validate(cfg, choices)
    return train.run(cfg, overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_a_few_steps_at_tiny_size(experiment, tmp_path):
    claim = paper.CLAIM_BY_NAME[experiment]
    summary = _run_tiny(experiment, claim.optimizers[0], tmp_path)
    assert summary["status"] == "finished" and summary["steps_done"] == 3
    assert all(math.isfinite(v) for v in summary["final"].values())
    if experiment in ("vit_scratch", "dead_rates"):
        assert summary["diagnostics"]["step"] == 3
        assert summary["diagnostics"]["diag/units"] > 0  # FFN units observed


@pytest.mark.slow
def test_collect_then_figures_on_real_tiny_runs(tmp_path):
    runs = tmp_path / "runs"
    for claim in paper.CLAIMS:
        for optimizer in claim.optimizers:
            for mult in ("1", "2"):
                _run_tiny(claim.name, optimizer, runs, [f"lr_mult={mult}"])
    out = tmp_path / "paper"
    written = paper.collect(runs, out, ["cpu"])
    assert len(written) == 4
    for claim in paper.CLAIMS:
        folder = out / claim.name / "cpu"
        rows = pd.read_csv(folder / paper.RUNS_CSV)
        assert len(rows) == 4 and rows["selected"].sum() == 2  # one setting per optimizer
        meta = json.loads((folder / paper.META_JSON).read_text())
        assert meta["steps"] == 3 and meta["lr_mults"] == [1.0, 2.0] and meta["runs"] == 4
    rows = paper.figures(out, readme=None)
    assert all(r["ours"] != paper.NOT_RUN for r in rows)
    assert all((out / r["figure"]).read_bytes()[:8] == PNG for r in rows)


def _fabricate(out, claim, runs, curves, scale="cpu"):
    folder = out / claim / scale
    folder.mkdir(parents=True)
    pd.DataFrame(runs).to_csv(folder / paper.RUNS_CSV, index=False)
    pd.DataFrame(curves).to_csv(folder / paper.CURVES_CSV, index=False)
    meta = {"claim": claim, "scale": scale, "model": "depth 4, width 64; 1000 params",
            "data": "made-up data", "steps": 100, "lr_mults": [0.5, 1.0, 2.0],
            "seeds": [0, 1], "runs": len(runs), "wall_time_s": 120.0}
    (folder / paper.META_JSON).write_text(json.dumps(meta))


def _run_row(opt, seed, selected=True, **values):
    base = {"optimizer": opt, "lr": 1e-3, "lr_mult": 1.0, "seed": seed, "variant": "v",
            "selected": selected, "diverged": False, "steps": 100, "steps_done": 100,
            "val_loss": math.nan, "train_eval_loss": math.nan, "gap_loss": math.nan,
            "val_acc": math.nan, "train_eval_acc": math.nan, "target_step": math.nan,
            "cells_read": math.nan, "cells_total": math.nan, "spare_frac": math.nan,
            "step_time_ms": 10.0, "wall_time_s": 30.0}
    return {**base, **values}


def test_figures_on_a_fabricated_results_tree(tmp_path, capsys):
    out = tmp_path / "paper"
    _fabricate(out, "lm_overtrain",
               [_run_row("ddc", 0, gap_loss=0.5), _run_row("ddc", 1, gap_loss=0.7),
                _run_row("adamw", 0, gap_loss=3.0), _run_row("adamw", 1, gap_loss=5.0),
                _run_row("adamw", 0, selected=False, gap_loss=9.0)],
               [{"optimizer": o, "seed": s, "step": st, "key": "gap_loss", "value": v}
                for o in ("ddc", "adamw") for s in (0, 1) for st, v in ((50, 0.1), (100, 0.5))])
    _fabricate(out, "grok_depth",
               [_run_row("ddc_muon", 0, target_step=400), _run_row("ddc_muon", 1, target_step=600),
                _run_row("ddc_muon", 2), _run_row("muon", 0), _run_row("muon", 1),
                _run_row("muon", 2)],
               [{"optimizer": "muon", "seed": 0, "step": 100, "key": "val_acc", "value": 0.1}])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{paper.TABLE_START}\nold table\n{paper.TABLE_END}\nafter\n")
    rows = paper.figures(out, readme)

    by_claim = {r["claim"].split(".")[0]: r for r in rows}
    assert by_claim["1"]["ours"] == ("DDC-Adam gap 0.60 ± 0.14 (n=2) [lr_mult 1]; "
                                     "AdamW gap 4.00 ± 1.41 (n=2) [lr_mult 1]")
    assert by_claim["3"]["ours"] == ("DDC-Muon grokked 2 of 3 seeds; steps-to-grok median 500, "
                                     "range 400-600 [lr_mult 1]; Muon grokked 0 of 3 seeds "
                                     "[lr_mult 1]")
    assert by_claim["2"]["ours"] == paper.NOT_RUN and by_claim["4"]["ours"] == paper.NOT_RUN
    assert by_claim["1"]["steps"] == "100" and "cpu:" in by_claim["1"]["scale"]
    for claim in ("lm_overtrain", "grok_depth"):
        assert (out / claim / "cpu" / f"{claim}.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "paper: gap: DDC-Adam 0.67, AdamW 5.88" in printed and "ours : DDC-Adam gap 0.60" in printed
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "[figure](paper/lm_overtrain/cpu/lm_overtrain.png)" in text
    assert (out / "README.md").read_text().count("\n| ") == 5  # header + 4 claims


def test_make_figures_on_empty_results_says_not_run_yet(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"{paper.TABLE_START}\n{paper.TABLE_END}\n")
    assert paper.main(["figures", "--out", str(tmp_path / "paper"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.count(paper.NOT_RUN) >= 4
    for claim in paper.CLAIMS:
        assert claim.paper in text  # the paper's number stands beside "not run yet"
    assert capsys.readouterr().out.count(f"ours : {paper.NOT_RUN}") == 4
    assert not any((tmp_path / "paper").glob("*/*/*.png"))


def test_committed_table_is_what_make_figures_builds_from_the_committed_results(tmp_path):
    """``make figures`` (``python -m ddc_bench.paper figures``) on a copy of the committed
    results/paper/ rebuilds exactly the README's committed table."""
    import shutil

    assert "-m ddc_bench.paper figures" in (REPO_ROOT / "Makefile").read_text()
    out = tmp_path / "results" / "paper"
    shutil.copytree(REPO_ROOT / "results" / "paper", out)
    readme = tmp_path / "README.md"
    committed = (REPO_ROOT / "README.md").read_text()
    readme.write_text(committed)
    paper.figures(out, readme)
    assert readme.read_text() == committed
    assert (out / "README.md").read_text() == (REPO_ROOT / "results" / "paper" / "README.md").read_text()


def test_collect_without_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "runs" / "grok_depth" / "cpu").mkdir(parents=True)
    code = paper.main(["collect", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"),
                       "--readme", str(tmp_path / "none.md")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no finished run under" in err and "\n" not in err
