"""The grid-extension sweep (ddc_bench.sweep_extend) on fabricated responses: it extends
by factors of 2 while the best lr_mult sits at an edge, stops once the best is inside the
grid, stops at the cap and flags it; and on a fabricated results folder (no training)."""

from __future__ import annotations

import json
import sys
import math

import pytest

from ddc_bench import sweep_extend as se
from tests.test_report_selection import make_run


def _fake(peaks: dict[str, float], start: list[float]):
    """A response with one optimum per optimizer at lr_mult ``peaks[opt]`` (score falls
    with the log-distance from it), a grid that starts at ``start``, and a launcher that
    adds the extension's point."""
    grids = {opt: list(start) for opt in peaks}

    def score(opt: str, m: float) -> float:
        return -abs(math.log2(m) - math.log2(peaks[opt]))

    def select():
        return ({o: sorted(g) for o, g in grids.items()},
                {o: max(g, key=lambda m: score(o, m)) for o, g in grids.items()})

    def launch(ext: se.Extension) -> None:
        grids[ext.optimizer].append(ext.lr_mult)

    return grids, select, launch


def test_extends_while_the_best_is_at_an_edge_and_stops_inside():
    grids, select, launch = _fake({"muon": 16.0, "adamw": 1.0, "sgd": 0.125}, [0.5, 1, 2, 4])
    made, flags = se.extend_until_interior(select, launch, cap=64, floor=1 / 64)
    # muon: 8 (best 8, edge), 16 (best 16, edge), 32 (best 16, inside) -> three extensions
    assert [e.lr_mult for e in made if e.optimizer == "muon"] == [8, 16, 32]
    assert all(e.edge == "high" for e in made if e.optimizer == "muon")
    assert [e.lr_mult for e in made if e.optimizer == "sgd"] == [0.25, 0.125, 0.0625]
    assert not [e for e in made if e.optimizer == "adamw"]
    assert flags == {} and select()[1] == {"muon": 16.0, "adamw": 1.0, "sgd": 0.125}


def test_stops_at_the_cap_and_flags_the_selection():
    grids, select, launch = _fake({"muon": 1000.0}, [0.5, 1, 2, 4])
    made, flags = se.extend_until_interior(select, launch, cap=32)
    assert [e.lr_mult for e in made] == [8, 16, 32]
    assert select()[1]["muon"] == 32 and flags == {"muon": "at the cap (lr_mult 32)"}
    assert se.plan_extensions(*select(), cap=32) == []


def test_edge_rules():
    assert se.edge_of([0.5, 1, 2], 2) == "high" and se.edge_of([0.5, 1, 2], 0.5) == "low"
    assert se.edge_of([0.5, 1, 2], 1) is None
    notes = se.edge_flags({"a": [1, 2], "b": [1, 2]}, {"a": 2, "b": 1}, cap=64)
    assert "high edge" in notes["a"] and "low edge" in notes["b"]
    with pytest.raises(se.ExtendError):
        se.extend_until_interior(lambda: ({}, {}), lambda e: None, cap=0.5)


def test_on_a_results_folder_prints_then_launches_and_records(tmp_path, capsys, monkeypatch):
    root = tmp_path / "sweep"
    peak = {"adamw": 8.0, "ddc": 1.0}

    def fabricate(opt: str, m: float) -> None:
        for seed in (0, 1):
            make_run(root, opt=opt, lr_mult=m, seed=seed,
                     final={"val_loss": 1 + abs(math.log2(m / peak[opt])) + 0.01 * seed})

    for opt in peak:
        for m in (0.5, 1, 2):
            fabricate(opt, m)
    assert se.main([str(root), "--", "experiment=x"]) == 0
    out = capsys.readouterr().out
    assert "ddc-bench --multirun experiment=x optimizer=adamw lr_mult=4 seed=0,1" in out
    assert "optimizer=ddc" not in out
    # an optimizer whose runs came from a config of another name is extended with that config
    assert se.main([str(root), "--choice", "adamw=adamw_variant", "--", "experiment=x"]) == 0
    assert "experiment=x optimizer=adamw_variant lr_mult=4 seed=0,1" in capsys.readouterr().out
    assert se.main([str(root), "--choice", "adamw", "--", "experiment=x"]) == 2
    assert "expected NAME=CONFIG" in capsys.readouterr().err

    launched = []

    def run(cmd, check):
        # the running interpreter's ddc_bench, whatever is on PATH
        assert cmd[:3] == [sys.executable, "-m", "ddc_bench.cli"]
        opt = next(a.split("=")[1] for a in cmd if a.startswith("optimizer="))
        m = float(next(a.split("=")[1] for a in cmd if a.startswith("lr_mult=")))
        launched.append((opt, m))
        fabricate(opt, m)

    monkeypatch.setattr(se.subprocess, "run", run)
    assert se.main([str(root), "--launch", "--cap", "16", "--", "experiment=x"]) == 0
    assert launched == [("adamw", 4.0), ("adamw", 8.0), ("adamw", 16.0)]
    log = [json.loads(line) for line in (root / se.LOG_FILE).read_text().splitlines()]
    assert [(e["optimizer"], e["lr_mult"], e["edge"]) for e in log] == \
        [("adamw", 4.0, "high"), ("adamw", 8.0, "high"), ("adamw", 16.0, "high")]
    assert log[0]["grid"] == [0.5, 1.0, 2.0] and log[0]["seeds"] == [0, 1]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert se.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert se.main([str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_a_folder_of_several_tasks_is_extended_one_task_at_a_time(tmp_path, capsys):
    """A comparison folder (results/compare) holds one sweep per task: --task picks one;
    without it the error names the tasks and the flag."""
    root = tmp_path / "compare"
    for task, peak in (("lm", 8.0), ("grok", 1.0)):
        for m in (0.5, 1, 2):
            make_run(root, task=task, opt="adamw", lr_mult=m, final={"val_loss": 1 + abs(math.log2(m / peak))})
    assert se.main([str(root), "--", "x=1"]) == 2
    err = capsys.readouterr().err
    assert "several tasks (grok, lm)" in err and "--task" in err and len(err.strip().splitlines()) == 1
    assert se.main([str(root), "--task", "lm", "--", "task=lm"]) == 0
    assert "task=lm optimizer=adamw lr_mult=4 seed=0" in capsys.readouterr().out
    assert se.main([str(root), "--task", "grok", "--", "task=grok"]) == 0
    assert "lr_mult=" not in capsys.readouterr().out.replace("[sweep_extend] no", "")
    assert se.main([str(root), "--task", "vit", "--", "task=vit"]) == 2
    assert "no finished run of it" in capsys.readouterr().err
