"""``sweep=lr_grid``: the packaged equal-budget lr grid, composed and (slow) run end to end."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR, ddc_bench

GRID = [0.25, 0.5, 1.0, 2.0, 4.0]


def test_lr_grid_sweeps_lr_mult_only() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=lr_grid"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    assert list(params) == ["lr_mult"]
    assert [float(v) for v in params["lr_mult"].split(",")] == GRID
    assert cfg.lr_mult == 1.0  # a single run outside --multirun keeps the recipe lr


@pytest.mark.slow
def test_lr_grid_multirun_gives_each_optimizer_its_own_grid(tmp_path) -> None:
    """Two optimizers with different recipe lrs: five runs each at 0.25x..4x their own lr,
    reported with the effective lr and one selected setting per optimizer."""
    out = ddc_bench("--multirun", "sweep=lr_grid", "optimizer=adamw,sgd", "task=grok_modadd",
                    "task.size=tiny", "steps=4", "eval_every=2", "seed=0", "hardware=cpu",
                    "hardware.threads=1", "progress=false", f"results_dir={tmp_path}",
                    cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    from ddc_bench.report import load_runs

    df = load_runs(tmp_path)
    assert len(df) == 10
    for opt, g in df.groupby("optimizer"):
        assert sorted(g["lr_mult"]) == GRID
        base = g["base_lr"].iloc[0]
        assert all(abs(lr - base * m) < 1e-12 * base for lr, m in zip(g["lr"], g["lr_mult"]))
    assert df.groupby("optimizer")["base_lr"].first().nunique() == 2
