"""The training loop, the LR schedule and the results it writes (on a fake task, in-process)."""

from __future__ import annotations

import json
import math
import sys
import time
import types

import pytest
import torch
from omegaconf import OmegaConf
from conftest import FakeTask, base_config, use_fake_task

from ddc_bench import checkpoint, results, train
from ddc_bench.config import CONFIG_DIR, ConfigError
from ddc_bench.loggers import LoggerError
from ddc_bench.schedule import build_scheduler, lr_factor, warmup_steps_for
from ddc_bench.training_optimizer import TrainingOptimizer

SUMMARY_KEYS = set(results.Summary.__annotations__)
PROVENANCE_KEYS = set(results.Provenance.__annotations__)


def _folder(cfg, lr="lr0.001", seed=0):
    return results.run_dir(cfg.results_dir, "fake", "tiny", cfg.optimizer.name, lr, seed)


# --------------------------------------------------------------------------------------
# LR schedule
# --------------------------------------------------------------------------------------

def test_schedule_warmup_is_linear_and_starts_above_zero():
    f = [lr_factor(s, total_steps=100, warmup_steps=4, kind="cosine", min_lr_ratio=0.1)
         for s in range(5)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)  # first decay step: t = 0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_decay_endpoints_and_floor(kind):
    kw = dict(total_steps=110, warmup_steps=10, kind=kind, min_lr_ratio=0.1)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.55)  # midpoint: both shapes give 1/2
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert lr_factor(10_000, **kw) == pytest.approx(0.1)  # never below the floor
    values = [lr_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_schedule_constant_and_no_warmup():
    assert lr_factor(0, total_steps=10, kind="constant") == 1.0
    assert lr_factor(9, total_steps=10, warmup_steps=0, kind="constant") == 1.0
    assert lr_factor(0, total_steps=10, kind="cosine", min_lr_ratio=0.0) == pytest.approx(1.0)
    assert warmup_steps_for(200, 0.05, None) == 10
    assert warmup_steps_for(200, 0.05, 3) == 3
    with pytest.raises(ValueError, match="schedule.kind"):
        lr_factor(0, total_steps=10, kind="step")


def test_scheduler_scales_every_param_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    kw = dict(total_steps=20, warmup_steps=5, kind="cosine", min_lr_ratio=0.2)
    sched = build_scheduler(opt, **kw)
    for step in range(25):
        factor = lr_factor(step, **kw)
        assert opt.param_groups[0]["lr"] == pytest.approx(1.0 * factor)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * factor)
        opt.step()
        sched.step()


# --------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [2, 3, 16])
def test_grad_accumulation_matches_full_batch(parts):
    task = FakeTask(dtype=torch.float64)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(task.train_batches(0))  # 16 samples: 3 parts split unevenly (6, 5, 5)
    cpu = torch.device("cpu")
    full = train.accumulate_gradients(task, model, batch, 1, cpu)
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    accum = train.accumulate_gradients(task, model, batch, parts, cpu)
    assert accum == pytest.approx(full, rel=1e-12)
    for g_full, p in zip(full_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g_full, rtol=1e-12, atol=1e-14)


def test_grad_accumulation_run_equals_full_batch_run(tmp_path, monkeypatch):
    finals = []
    for accum in (1, 4):
        use_fake_task(monkeypatch, FakeTask(dtype=torch.float64))
        cfg = base_config(tmp_path / f"a{accum}", steps=6, **{"hardware.grad_accum": accum})
        finals.append(train.run(cfg, overrides=[])["final"])
    assert finals[0] == pytest.approx(finals[1], rel=1e-9)


def test_grad_accum_larger_than_batch_is_an_error(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=2, **{"hardware.grad_accum": 64})
    with pytest.raises(ConfigError, match="grad_accum=64 exceeds the batch size 16"):
        train.run(cfg, overrides=[])


# --------------------------------------------------------------------------------------
# A run and its files
# --------------------------------------------------------------------------------------

def test_run_writes_config_metrics_and_summary(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=20, log_every=5, seed=3)
    summary = train.run(cfg, overrides=["steps=20"])
    # An overridden key other than optimizer.lr names the variant folder, after lr<lr>.
    assert summary["variant"] == "lr0.001,steps=20" and summary["variant_keys"] == {"steps": 20}
    folder = _folder(cfg, lr=summary["variant"], seed=3)
    assert results.is_finished(folder)
    assert (folder / results.CONFIG_FILE).read_text().startswith("seed: 3")

    on_disk = json.loads((folder / results.SUMMARY_FILE).read_text())
    assert SUMMARY_KEYS == set(on_disk)  # exactly the schema
    assert PROVENANCE_KEYS <= set(on_disk["provenance"])
    assert torch.__version__.startswith(on_disk["provenance"]["packages"]["torch"])
    assert summary["status"] == "finished" and summary["diverged"] is False
    assert (summary["steps"], summary["steps_done"], summary["seed"]) == (20, 20, 3)
    assert summary["overrides"] == ["steps=20"]
    assert (summary["lr"], summary["base_lr"], summary["lr_mult"]) == (1e-3, 1e-3, 1.0)
    assert summary["hardware"]["threads"] == 1 and summary["hardware"]["world_size"] == 1
    assert summary["unit"] == "samples" and summary["units_per_s"] > 0
    assert summary["peak_memory_mb"] > 0 and summary["step_time_ms"] > 0
    assert set(summary["final"]) == {"train_eval_loss", "train_eval_acc", "val_loss",
                                     "val_acc", "gap_loss"}
    assert summary["best"]["val_acc"] >= summary["final"]["val_acc"]
    assert summary["target"] is None

    records = results.read_metrics(folder)
    assert all({"step", "train_time_s", "lr"} <= set(r) for r in records)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20]
    assert all("units_per_s" in r for r in train_lines)
    # eval_every null -> about 10 evaluations: every 2 steps, the last at the end.
    assert [r["step"] for r in eval_lines] == list(range(2, 21, 2))
    last = eval_lines[-1]
    assert last["gap_loss"] == pytest.approx(last["val_loss"] - last["train_eval_loss"])
    assert summary["final"] == {k: v for k, v in last.items() if k not in ("step", "train_time_s", "lr")}
    times = [r["train_time_s"] for r in records]
    assert times == sorted(times) and times[-1] == pytest.approx(summary["train_time_s"])


def test_training_time_excludes_evaluation(tmp_path, fake_task, monkeypatch):
    """Each evaluation moves the run's clock 100 s forward (a fake clock, no sleeping): the
    wall time holds all 8 jumps, the training time none."""
    jumps = {"s": 0.0}
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + jumps["s"])
    monkeypatch.setattr(train, "time", clock)
    evaluate = fake_task.evaluate

    def jumping_evaluate(*args, **kwargs):
        jumps["s"] += 50.0  # twice per evaluation (train and val splits)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(fake_task, "evaluate", jumping_evaluate)
    summary = train.run(base_config(tmp_path, steps=4, eval_every=1), overrides=[])
    assert summary["wall_time_s"] >= 400  # 4 evaluations of 100 fake seconds
    assert summary["train_time_s"] < 100  # not one of them


def test_lr_logged_follows_the_schedule(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=10, log_every=1, **{"schedule.warmup_steps": 2,
                                                          "schedule.kind": "linear"})
    train.run(cfg, overrides=[])
    lrs = [r["lr"] for r in results.read_metrics(_folder(cfg)) if "loss" in r]
    expected = [1e-3 * lr_factor(s, total_steps=10, warmup_steps=2, kind="linear",
                                 min_lr_ratio=0.1) for s in range(10)]
    assert lrs == pytest.approx(expected)


def test_target_reached_and_not_reached(tmp_path, fake_task):
    fake_task.target = {"metric": "val_acc", "value": 0.5, "mode": "max"}
    summary = train.run(base_config(tmp_path, steps=20, eval_every=1), overrides=[])
    target = summary["target"]
    assert target["metric"] == "val_acc" and target["value"] == 0.5
    assert 1 <= target["step"] <= 20 and 0 < target["time_s"] <= summary["train_time_s"]
    evals = [r for r in results.read_metrics(_folder(base_config(tmp_path))) if "val_acc" in r]
    first = next(r["step"] for r in evals if r["val_acc"] >= 0.5)
    assert target["step"] == first

    fake_task.target = {"metric": "loss", "value": -1.0, "mode": "min"}  # "loss" -> val_loss
    summary = train.run(base_config(tmp_path, steps=5, run_name="never"), overrides=[])
    assert summary["target"]["step"] is None and summary["target"]["time_s"] is None


def test_the_declared_target_mode_is_used_and_stored_in_the_summary(tmp_path, fake_task):
    """One rule for "target reached": the task's ``mode``, not the metric's name. A
    ``val_acc`` target with ``mode: min`` at 1.0 is met by the first evaluation."""
    fake_task.target = {"metric": "val_acc", "value": 1.0, "mode": "min"}
    cfg = base_config(tmp_path, steps=4, eval_every=2)
    summary = train.run(cfg, overrides=[])
    assert summary["target"]["mode"] == "min" and summary["target"]["step"] == 2
    on_disk = json.loads((_folder(cfg) / results.SUMMARY_FILE).read_text())
    assert on_disk["target"]["mode"] == "min"


def test_target_metric_typo_is_an_error(tmp_path, fake_task):
    fake_task.target = {"metric": "val_accuracy", "value": 0.5, "mode": "max"}
    with pytest.raises(ConfigError, match="task.target.metric='val_accuracy' is not an evaluation metric"):
        train.run(base_config(tmp_path, steps=2), overrides=[])


def test_run_name_is_the_variant_folder(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=2, run_name="myvariant")
    summary = train.run(cfg, overrides=[])
    assert summary["variant"] == "myvariant"
    assert results.is_finished(_folder(cfg, lr="myvariant"))


# --------------------------------------------------------------------------------------
# Finished and interrupted runs
# --------------------------------------------------------------------------------------

def test_finished_run_is_never_overwritten(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=3)
    train.run(cfg, overrides=[])
    folder = _folder(cfg)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(train.AlreadyFinished, match="already holds this run, finished; skipped"):
        train.run(cfg, overrides=[])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_finished_run_of_another_config_is_refused(tmp_path, fake_task):
    train.run(base_config(tmp_path, steps=3, run_name="x"), overrides=[])
    folder = _folder(base_config(tmp_path), lr="x")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(results.RunExistsError, match=r"finished run of another config \(differs in steps\)"):
        train.run(base_config(tmp_path, steps=4, run_name="x"), overrides=[])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_interrupted_run_is_moved_aside(tmp_path, fake_task, capsys):
    cfg = base_config(tmp_path, steps=3)
    folder = _folder(cfg)
    folder.mkdir(parents=True)
    (folder / results.METRICS_FILE).write_text('{"step": 1}\n')
    train.run(cfg, overrides=[])
    aside = folder.with_name("seed0.interrupted-1")
    assert (aside / results.METRICS_FILE).read_text() == '{"step": 1}\n'
    assert results.is_finished(folder)
    assert f"moved the interrupted run found at {folder} to {aside}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [
    {"name": "adamw", "lr": 1e30, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    {"name": "sgd", "lr": 1e30, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
], ids=["adamw", "sgd"])
def test_divergence_stops_cleanly(tmp_path, fake_task, optimizer):
    cfg = base_config(tmp_path, steps=50, grad_clip=None)
    cfg.optimizer = optimizer
    summary = train.run(cfg, overrides=[])
    assert summary["status"] == "diverged" and summary["diverged"] is True
    assert summary["steps_done"] < 50
    folder = results.run_dir(cfg.results_dir, "fake", "tiny", optimizer["name"],
                             results.default_variant(optimizer["lr"]), 0)
    assert json.loads((folder / results.SUMMARY_FILE).read_text())["status"] == "diverged"


def test_nonfinite_loss_marks_divergence_before_stepping(tmp_path, fake_task, monkeypatch):
    loss = fake_task.loss
    calls = {"n": 0}

    def nan_on_third(model, batch):
        calls["n"] += 1
        value, extra = loss(model, batch)
        return (value * float("nan") if calls["n"] == 3 else value), extra

    monkeypatch.setattr(fake_task, "loss", nan_on_third)
    summary = train.run(base_config(tmp_path, steps=10, eval_every=1), overrides=[])
    assert summary["status"] == "diverged" and summary["steps_done"] == 2
    assert all(math.isfinite(v) for v in summary["final"].values())  # last good evaluation


# --------------------------------------------------------------------------------------
# Hardware and loggers
# --------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_an_error(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=2, **{"hardware.device": "cuda"})
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train.run(cfg, overrides=[])


def test_autocast_bf16_on_cpu_runs(tmp_path, fake_task):
    summary = train.run(base_config(tmp_path, steps=3, **{"hardware.autocast": "bfloat16"}),
                        overrides=[])
    assert summary["status"] == "finished"


def test_float16_autocast_is_refused(tmp_path, fake_task):
    with pytest.raises(ConfigError, match="hardware.autocast"):
        train.run(base_config(tmp_path, steps=2, **{"hardware.autocast": "float16"}),
                  overrides=[])


def test_wandb_missing_is_one_clear_error(tmp_path, fake_task, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = base_config(tmp_path, steps=2)
    cfg.logger = {"name": "wandb", "project": "p", "entity": None, "group": None, "tags": [],
                  "mode": None}
    with pytest.raises(LoggerError, match=r"pip install 'ddc-bench\[wandb\]'"):
        train.run(cfg, overrides=[])
    assert not (tmp_path / "results").exists()  # failed before creating the run folder


def test_wandb_offline(tmp_path, fake_task, wandb_offline):
    cfg = base_config(tmp_path, steps=4, log_every=1)
    cfg.logger = {"name": "wandb", "project": "ddc-bench-test", "entity": None, "group": None,
                  "tags": ["test"], "mode": None}
    summary = train.run(cfg, overrides=[])
    assert summary["status"] == "finished"
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


# --------------------------------------------------------------------------------------
# The hook point, threads, the run lock, run_name, lr_mult
# --------------------------------------------------------------------------------------

def test_hooks_add_keys_to_every_record_and_the_summary(tmp_path, fake_task):
    calls = []

    def weight_norm(state, step, record):
        calls.append(step)
        record["weight_norm"] = float(sum(p.detach().norm() ** 2 for p in state.model.parameters()) ** 0.5)

    cfg = base_config(tmp_path, steps=4, log_every=2, eval_every=4)
    summary = train.run(cfg, overrides=[], hooks=[weight_norm])
    records = results.read_metrics(_folder(cfg))
    assert calls == [2, 4, 4] and all("weight_norm" in r for r in records)
    assert summary["final"]["weight_norm"] == records[-1]["weight_norm"]


def test_threads_auto_is_one_for_small_models_and_explicit_values_win(tmp_path, fake_task):
    assert train.run(base_config(tmp_path / "a", steps=1), overrides=[])["hardware"]["threads"] == 1
    summary = train.run(base_config(tmp_path / "b", steps=1, **{"hardware.threads": 2}), overrides=[])
    assert summary["hardware"]["threads"] == 2
    from ddc_bench.plan import AUTO_ONE_THREAD_BELOW, DEFAULT_THREADS, resolve_threads

    assert resolve_threads(None, AUTO_ONE_THREAD_BELOW) == DEFAULT_THREADS
    assert resolve_threads(0, 10) == DEFAULT_THREADS


def test_a_locked_run_folder_is_refused_and_a_dead_owner_does_not_block(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=2)
    folder = _folder(cfg)
    with results.RunLock(folder):
        with pytest.raises(results.RunLockedError, match=f"{folder} is in use by another run "
                                                         r"\(pid \d+ on host"):
            train.run(cfg, overrides=[])
    # A lock file left by a killed process (no one holds the lock) is not in the way.
    results.lock_path(folder).write_text("pid 999999 on host gone\n")
    assert train.run(cfg, overrides=[])["status"] == "finished"
    assert not results.lock_path(folder).exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", ".."])
def test_run_name_must_stay_inside_results_dir(tmp_path, fake_task, name):
    with pytest.raises(results.ResultsDirError, match="must be a single folder name inside results_dir"):
        train.run(base_config(tmp_path, steps=1, run_name=name), overrides=[])
    assert not (tmp_path / "results").exists() and not (tmp_path.parent / "x").exists()


def test_lr_mult_scales_the_optimizer_lr_and_names_the_folder(tmp_path, fake_task):
    summary = train.run(base_config(tmp_path, steps=2, lr_mult=3.0), overrides=["lr_mult=3"])
    assert summary["lr"] == pytest.approx(3e-3) and summary["base_lr"] == 1e-3
    assert summary["variant"] == "lr0.001,lr_mult=3" and summary["variant_keys"] == {"lr_mult": 3.0}


# --------------------------------------------------------------------------------------
# Harness side of the DDC library (issue 10): gauge check at start-up, DDC's own clipping
# --------------------------------------------------------------------------------------

def test_a_wrong_gauge_declaration_stops_a_ddc_run_before_training(tmp_path, fake_task, monkeypatch):
    from ddc.gauges import LogitShift
    from conftest import FakeModel

    # A logit shift of the hidden layer is no symmetry: a ReLU follows it.
    monkeypatch.setattr(FakeModel, "gauges", lambda self: [LogitShift(self.hidden)])
    cfg = base_config(tmp_path, steps=2)
    cfg.optimizer = OmegaConf.load(CONFIG_DIR / "optimizer" / "ddc.yaml")
    with pytest.raises(ConfigError, match="declares a gauge that is not an exact symmetry") as err:
        train.run(cfg, overrides=[])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("seed*"))


# --------------------------------------------------------------------------------------
# The loop contract: every TrainingOptimizer field is honoured (small fake optimizers)
# --------------------------------------------------------------------------------------

class RecordingSGD(torch.optim.SGD):
    """SGD that records its steps (how many, the lr each used, and the gradients it saw)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.lrs: list[float] = []
        self.grads_with_graph: list[bool] = []
        self.closure_losses: list[float] = []

    def step(self, closure=None):
        if closure is not None:
            self.closure_losses.append(float(closure()))
        self.lrs.append(self.param_groups[0]["lr"])
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.grads_with_graph.append(all(g.requires_grad for g in grads))
        with torch.no_grad():
            return super().step()


def _use_optimizer(monkeypatch, **fields) -> dict:
    """Make ``train`` build a RecordingSGD wrapped with ``fields``; returns what it built."""
    built: dict = {}

    def build(model, cfg, loss_fn=None):
        built["optimizer"] = RecordingSGD(model.parameters(), lr=cfg["lr"])
        built["model"] = model
        return TrainingOptimizer(built["optimizer"], **{
            k: (v(built) if callable(v) and k in ("clip_grad_norm", "startup_check",
                                                  "train_mode", "eval_mode") else v)
            for k, v in fields.items()})

    monkeypatch.setattr(train, "build_optimizer", build)
    return built


def test_the_training_optimizers_clip_replaces_torchs(tmp_path, fake_task, monkeypatch):
    own, torchs = [], []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: torchs.append(norm))
    _use_optimizer(monkeypatch, clip_grad_norm=lambda built: own.append)
    train.run(base_config(tmp_path / "a", steps=3, grad_clip=0.5), overrides=[])
    assert own == [0.5, 0.5, 0.5] and torchs == []
    _use_optimizer(monkeypatch)  # no clip of its own: torch's, over the model's parameters
    train.run(base_config(tmp_path / "b", steps=3, grad_clip=0.5), overrides=[])
    assert torchs == [0.5, 0.5, 0.5]


def test_the_startup_check_sees_the_model_and_the_first_batch_and_can_refuse(tmp_path, fake_task,
                                                                           monkeypatch):
    seen = []
    built = _use_optimizer(monkeypatch, startup_check=lambda built: lambda m, b: seen.append((m, b)))
    train.run(base_config(tmp_path / "a", steps=2, seed=4), overrides=[])
    ((model, batch),) = seen
    first = next(iter(fake_task.train_batches(4)))
    assert model is built["model"] and all(torch.equal(a, b) for a, b in zip(batch, first))

    def refuse(built):
        def check(model, batch):
            raise ConfigError("this model will not do")
        return check

    _use_optimizer(monkeypatch, startup_check=refuse)
    with pytest.raises(ConfigError, match="optimizer=adamw, task=fake: this model will not do"):
        train.run(base_config(tmp_path / "b", steps=2), overrides=[])
    assert not any((tmp_path / "b").rglob("seed*"))  # refused before the run folder


def test_eval_mode_before_evaluations_train_mode_before_steps_and_mid_run_checkpoints(
        tmp_path, fake_task, monkeypatch):
    events: list[tuple[str, int]] = []
    modes = {"now": None}

    def switch(name):
        def make(built):
            def call():
                modes["now"] = name
                events.append((name, len(built["optimizer"].lrs)))
            return call
        return make

    evaluate = fake_task.evaluate

    def checked_evaluate(*args, **kwargs):
        assert modes["now"] == "eval"
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(fake_task, "evaluate", checked_evaluate)
    _use_optimizer(monkeypatch, train_mode=switch("train"), eval_mode=switch("eval"))
    saved_modes = []
    save = checkpoint.save

    def checked_save(*args, **kwargs):
        saved_modes.append(modes["now"])
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", checked_save)
    cfg = base_config(tmp_path / "b", steps=8, eval_every=4, checkpoint_every=2, log_every=1)
    events.clear()
    train.run(cfg, overrides=[])
    # Evaluations at 4 and 8; mid-run checkpoints at 2, 4 and 6 in train mode (a resumed run
    # continues from the exact training point), the final one at 8 in eval mode.
    assert events == [("train", 0), ("eval", 4), ("train", 4), ("eval", 8)]
    assert saved_modes == ["train", "train", "train", "eval"]


def test_create_graph_keeps_the_backward_graph_for_the_optimizer(tmp_path, fake_task, monkeypatch):
    built = _use_optimizer(monkeypatch, create_graph=True)
    train.run(base_config(tmp_path / "a", steps=2, grad_clip=0), overrides=[])
    assert built["optimizer"].grads_with_graph == [True, True]
    built = _use_optimizer(monkeypatch)
    train.run(base_config(tmp_path / "b", steps=2, grad_clip=0), overrides=[])
    assert built["optimizer"].grads_with_graph == [False, False]


def test_needs_closure_passes_a_closure_that_recomputes_the_loss(tmp_path, fake_task, monkeypatch):
    built = _use_optimizer(monkeypatch, needs_closure=True)
    cfg = base_config(tmp_path, steps=3, log_every=1, grad_clip=0)
    train.run(cfg, overrides=[])
    logged = [r["loss"] for r in results.read_metrics(_folder(cfg)) if "loss" in r]
    # The closure recomputes the loss on the step's batch, before the step: the same value.
    assert built["optimizer"].closure_losses == pytest.approx(logged)


def test_without_external_schedule_the_loop_leaves_the_lr_alone(tmp_path, fake_task, monkeypatch):
    class HalvingSGD(RecordingSGD):
        """Schedules itself: halves its lr after every step."""

        def step(self, closure=None):
            out = super().step(closure)
            for group in self.param_groups:
                group["lr"] *= 0.5
            return out

    built: dict = {}

    def build(model, cfg, loss_fn=None):
        built["optimizer"] = HalvingSGD(model.parameters(), lr=cfg["lr"])
        return TrainingOptimizer(built["optimizer"], external_schedule=False)

    monkeypatch.setattr(train, "build_optimizer", build)
    cfg = base_config(tmp_path / "a", steps=4, log_every=1, **{"schedule.warmup_steps": 2})
    train.run(cfg, overrides=[])
    assert built["optimizer"].lrs == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])
    assert [r["lr"] for r in results.read_metrics(_folder(cfg)) if "loss" in r] == [1e-3] * 4
    built = _use_optimizer(monkeypatch)  # external schedule: the warmup applies
    train.run(base_config(tmp_path / "b", steps=4, log_every=1, **{"schedule.warmup_steps": 2}),
              overrides=[])
    assert built["optimizer"].lrs[:2] == pytest.approx([5e-4, 1e-3])


def test_build_optimizer_returns_a_training_optimizer_for_every_registered_name():
    from ddc_bench.optimizers import build_optimizer, registry

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for name in ("adamw", "sgd"):
        assert name in registry()
        built = build_optimizer(model, {"name": name, "lr": 1e-3})
        assert isinstance(built, TrainingOptimizer) and built.clip_grad_norm is None
        assert isinstance(built.optimizer, torch.optim.Optimizer)


def test_several_processes_without_the_ddp_profile_are_refused(tmp_path, fake_task, monkeypatch):
    from ddc_bench.distributed import DistributedError

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(DistributedError, match="use hardware=ddp"):
        train.run(base_config(tmp_path, steps=1), overrides=[])
