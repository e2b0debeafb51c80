"""The ``ddc-bench`` command: composition, bad input, results layout, sweeps.

Config checks run in-process (Hydra's compose API + ``ddc_bench.config.validate``); the
behaviour a user sees (exit codes, one-line errors, nothing in the working directory,
``--multirun``) is checked with a few real ``ddc-bench`` subprocesses.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import compose, ddc_bench
from hydra.errors import ConfigCompositionException, MissingConfigException

from ddc_bench import results
from ddc_bench.config import ConfigError, validate

TINY = ["task=grok_modadd", "task.size=tiny", "hardware=cpu", "progress=false"]


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------

def test_defaults_compose():
    cfg, choices = compose([])
    validate(cfg, choices)
    assert choices["optimizer"] == "adamw" and choices["hardware"] == "auto"
    assert choices["logger"] == "none" and choices["experiment"] is None
    assert cfg.seed == 0 and cfg.steps is None and cfg.results_dir == "results"
    assert cfg.schedule.kind == "cosine" and cfg.grad_clip == 1.0


def test_hydra_writes_nothing_into_the_working_directory():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddc_bench.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        hydra = hydra_compose("config", overrides=["results_dir=R"], return_hydra_config=True).hydra
    assert hydra.output_subdir is None and hydra.job.chdir is False
    assert hydra.run.dir.startswith("R/.hydra")
    assert hydra.sweep.dir.startswith("R/.hydra")
    assert set(hydra.job_logging.handlers) == {"console"}  # no <job>.log file


def test_quickstart_sweeps_adamw_and_ddc_over_two_lrs_and_two_seeds():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddc_bench.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["experiment=quickstart"],
                            return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"optimizer": "adamw,ddc", "optimizer.lr": "1e-3,3e-3",
                                              "seed": "0,1"}
    assert cfg.results_dir == "results/quickstart" and cfg.task.name == "gpt_lm"
    assert cfg.hydra.runtime.choices.hardware == "cpu"


def test_slurm_sweep_config_selects_the_submitit_launcher():
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401 - the cluster extra, installed by make
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddc_bench.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["sweep=slurm", "results_dir=/shared/r"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    assert launcher.submitit_folder.startswith("/shared/r/.hydra/multirun/")
    assert "sweep" not in cfg  # a launcher choice only: the job config is unchanged


def test_cluster_sweeps_are_overridable_and_submitit_local_uses_the_local_executor():
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401 - the cluster extra, installed by make
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddc_bench.config import CONFIG_DIR

    overrides = ["sweep=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                 "hydra.launcher.cpus_per_task=16", "hydra.launcher.mem_gb=128",
                 "hydra.launcher.timeout_min=600"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        slurm = hydra_compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
        local = hydra_compose("config", overrides=["sweep=submitit_local"],
                              return_hydra_config=True).hydra.launcher
    assert (slurm.partition, slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb,
            slurm.timeout_min) == ("gpu", 4, 16, 128, 600)
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 0


# --------------------------------------------------------------------------------------
# Bad input, in-process: one line naming the key and the expected type
def test_bench_config_is_configs_config_yaml():
    """BenchConfig (the schema) and configs/config.yaml (the defaults) state the same keys
    and the same default values: nothing ties them otherwise."""
    import dataclasses

    from omegaconf import OmegaConf

    from ddc_bench.config import CONFIG_DIR, BenchConfig

    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))
    for key in ("defaults", "hydra"):
        yaml.pop(key)
    schema = dataclasses.asdict(BenchConfig())
    groups = {"task", "optimizer", "hardware", "logger"}  # typed by their YAMLs instead
    assert set(schema) - groups == set(yaml)
    assert {k: v for k, v in schema.items() if k not in groups} == yaml


@pytest.mark.parametrize("overrides, value", [
    (["task=gpt_lm", "task.size=tiny"], 1.92),
    (["task=gpt_lm", "task.size=small"], 2.19),
    (["task=gpt_lm", "task.size=paper"], None),
    (["task=gpt_lm", "task.size=small", "task.target.value=1.5"], 1.5),
    (["task=gpt_lm", "task.size=small", "task.target.by_size.small=2.0"], 2.0),
    (["task=grok_modadd", "task.size=small"], 0.98),
    (["task=grok_modadd", "task.size=tiny"], 0.99),
    (["task=vit_cifar", "task.size=small"], None),
])
def test_the_target_of_a_task_is_chosen_by_size(overrides, value, tmp_path):
    from ddc_bench.plan import make_plan

    cfg, choices = compose([*overrides, "hardware=cpu", f"results_dir={tmp_path}"])
    validate(cfg, choices)
    plan = make_plan(cfg, [])
    target = plan.task.target
    assert (target and target["value"]) == value
    recorded = plan.resolved["task"]["target"]  # what config.yaml holds and runs build from
    assert "by_size" not in recorded and recorded["value"] == value


# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("steps=abc", "invalid value for 'steps': 'abc' (expected int or null)"),
    ("seed=1.5", "invalid value for 'seed': 1.5 (expected int)"),
    ("grad_clip=x", "invalid value for 'grad_clip': 'x' (expected float or null)"),
    ("progress=maybe", "invalid value for 'progress': 'maybe' (expected bool (true/false))"),
    ("schedule.kind=step", "invalid value for 'schedule.kind': 'step' (expected one of cosine, linear, constant)"),
    ("steps=0", "invalid value for 'steps': 0 (expected a positive int or null)"),
    ("schedule.min_lr_ratio=2", "invalid value for 'schedule.min_lr_ratio': 2 (expected a float in [0, 1])"),
    ("optimizer.lr=fast", "invalid value for 'optimizer.lr': 'fast' (expected float, as in configs/optimizer/adamw.yaml)"),
    ("optimizer.betas=[0.9,x]", "invalid value for 'optimizer.betas[1]': 'x' (expected float, as in configs/optimizer/adamw.yaml)"),
    ("hardware.grad_accum=two", "invalid value for 'hardware.grad_accum': 'two' (expected int, as in configs/hardware/auto.yaml)"),
    ("hardware.compile=3", "invalid value for 'hardware.compile': 3 (expected bool (true/false), as in configs/hardware/auto.yaml)"),
    ("task.model.depth=abc", "invalid value for 'task.model.depth': 'abc' (expected int, as in the 'tiny' preset of task grok_modadd)"),
    ("task.steps=1.5", "invalid value for 'task.steps': 1.5 (expected int, as in the 'tiny' preset of task grok_modadd)"),
    ("task.model.causal=yes", "invalid value for 'task.model.causal': 'yes' (expected bool (true/false), as in configs/task/grok_modadd.yaml)"),
    ("+foo=1", "unknown config key 'foo'"),
    ("+task.model.depht=2", "unknown config key 'task.model.depht' (configs/task/grok_modadd.yaml has no such field)"),
])
def test_wrong_values_are_rejected_with_one_line(override, message):
    cfg, choices = compose([override])
    with pytest.raises(ConfigError) as info:
        validate(cfg, choices)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_preset_typed_list_field():
    cfg, choices = compose(["task=resnet_cifar", "task.model.blocks=[1,x,1]"])
    with pytest.raises(ConfigError, match=r"'task.model.blocks\[1\]': 'x' \(expected int"):
        validate(cfg, choices)
    cfg, choices = compose(["task=resnet_cifar", "task.model.blocks=[2,2]"])
    validate(cfg, choices)


def test_accepted_values():
    cfg, choices = compose(["optimizer.lr=1", "run_name=7", "grad_clip=null", "steps=5",
                            "hardware=cuda_bf16", "hardware.autocast=null", "task.model.depth=3"])
    validate(cfg, choices)
    assert cfg.run_name == "7"  # numbers given for text fields are kept as text


def test_unknown_key_and_option_fail_in_hydra():
    with pytest.raises(ConfigCompositionException, match="Could not override 'foo'"):
        compose(["foo=1"])
    with pytest.raises(MissingConfigException, match="optimizer/nope"):
        compose(["optimizer=nope"])


# --------------------------------------------------------------------------------------
# Bad input, as the user sees it
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("group, expected", [("optimizer", "adamw"), ("task", "gpt_lm"),
                                             ("hardware", "cuda_bf16")])
def test_unknown_group_option_lists_the_choices(tmp_path, group, expected):
    proc = ddc_bench(f"{group}=nope", cwd=tmp_path)
    assert proc.returncode == 1
    assert f"Could not find '{group}/nope'" in proc.stderr
    assert f"Available options in '{group}'" in proc.stderr and expected in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_values_exit_with_one_line_before_training(tmp_path):
    proc = ddc_bench("steps=abc", "results_dir=out", *TINY, cwd=tmp_path)
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert line == "ddc-bench: error: invalid value for 'steps': 'abc' (expected int or null)"
    assert not list((tmp_path / "out").glob("grok_modadd-*"))  # nothing trained

    proc = ddc_bench("foo=1", *TINY, cwd=tmp_path)
    assert proc.returncode == 1 and "Key 'foo' is not in struct" in proc.stderr


def test_missing_cifar_is_one_line(tmp_path):
    proc = ddc_bench("task=vit_cifar", "task.size=tiny", f"task.data.root={tmp_path / 'nodata'}",
                     "hardware=cpu", "results_dir=out", cwd=tmp_path)
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert line.startswith("ddc-bench: error: ") and "nodata" in line
    assert not list((tmp_path / "out").glob("vit_cifar-*"))


# --------------------------------------------------------------------------------------
# Runs through the command
# --------------------------------------------------------------------------------------

def test_run_writes_results_and_skips_it_when_launched_again(tmp_path):
    args = [*TINY, "steps=3", "seed=2", "results_dir=res", "optimizer=adamw"]
    proc = ddc_bench(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = results.run_dir(tmp_path / "res", "grok_modadd", "tiny", "adamw", "lr0.001,steps=3", 2)
    # Checkpoints at each evaluation (here every step) and at the end; the last two kept.
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt",
                                                        "config.yaml", "metrics.jsonl",
                                                        "summary.json"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 3
    assert summary["overrides"] == args and summary["variant_keys"] == {"steps": 3}
    assert summary["target"]["metric"] == "val_acc"  # grok_modadd's default target
    assert "threads=1" in proc.stdout  # auto: one thread for a tiny model
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("[ddc-bench] finished res/grok_modadd-tiny/adamw/lr0.001,steps=3/seed2")
    assert "val_acc=" in last
    # Hydra wrote nothing into the working directory: only the results folder is there.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    again = ddc_bench(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already holds this run, finished; skipped" in _one_line(again.stdout)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_divergence_exits_zero(tmp_path):
    proc = ddc_bench(*TINY, "steps=20", "optimizer.lr=1e30", "results_dir=res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = results.run_dir(tmp_path / "res", "grok_modadd", "tiny", "adamw", "lr1e+30,steps=20", 0)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["diverged"] is True and summary["status"] == "diverged"
    assert summary["steps_done"] < 20
    assert "[ddc-bench] diverged" in proc.stdout


def test_multirun_lands_in_one_results_dir(tmp_path):
    proc = ddc_bench("--multirun", "optimizer=adamw,sgd", "seed=0,1", *TINY, "steps=3",
                     "results_dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[ddc-bench] sweep done: 4 finished" in proc.stdout
    runs = list(results.iter_finished_runs(tmp_path / "sweep"))
    found = {(r.parent.parent.name, r.name) for r in runs}
    assert found == {(o, f"seed{s}") for o in ("adamw", "sgd") for s in (0, 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    if importlib.util.find_spec("ddc_bench.report") is not None:
        from ddc_bench.report import build_report

        build_report(tmp_path / "sweep")


@pytest.mark.slow
def test_a_sweep_launched_again_skips_finished_runs_and_exits_zero(tmp_path):
    first = ddc_bench(*TINY, "steps=2", "results_dir=res", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    proc = ddc_bench("--multirun", "seed=0,1", *TINY, "steps=2", "results_dir=res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already holds this run, finished; skipped" in proc.stdout
    assert "sweep done: 1 skipped, 1 finished" in proc.stdout
    assert results.is_finished(
        results.run_dir(tmp_path / "res", "grok_modadd", "tiny", "adamw", "lr0.001,steps=2", 1))


def test_multirun_goes_on_after_a_failed_run_and_exits_nonzero(tmp_path):
    proc = ddc_bench("--multirun", "task.data.op=pow,add", *TINY, "steps=2", "results_dir=res",
                     cwd=tmp_path)
    assert proc.returncode == 1
    assert "task.data.op" in _one_line(proc.stderr)
    assert "sweep done: 1 failed, 1 finished" in proc.stdout


@pytest.mark.slow
def test_a_weight_decay_sweep_gives_distinct_folders(tmp_path):
    proc = ddc_bench("--multirun", "optimizer.weight_decay=0,0.1", *TINY, "steps=2",
                     "results_dir=res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = sorted(results.iter_finished_runs(tmp_path / "res"))
    assert [r.parent.name for r in runs] == ["lr0.001,optimizer.weight_decay=0,steps=2",
                                            "lr0.001,optimizer.weight_decay=0.1,steps=2"]
    keys = [json.loads((r / "summary.json").read_text())["variant_keys"] for r in runs]
    assert keys == [{"optimizer.weight_decay": 0, "steps": 2},
                    {"optimizer.weight_decay": 0.1, "steps": 2}]


@pytest.mark.slow
def test_lr_mult_scales_the_learning_rate(tmp_path):
    proc = ddc_bench(*TINY, "steps=2", "lr_mult=2", "results_dir=res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = results.iter_finished_runs(tmp_path / "res")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["lr"], summary["base_lr"], summary["lr_mult"]) == (2e-3, 1e-3, 2.0)
    assert summary["variant_keys"] == {"lr_mult": 2.0, "steps": 2}
    lrs = [r["lr"] for r in results.read_metrics(run) if "loss" in r]
    assert lrs and max(lrs) <= 2e-3 and max(lrs) > 1e-3  # the lr actually used
