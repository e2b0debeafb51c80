"""Extend a learning-rate grid while an optimizer's selected setting sits at its edge.

A selection at the edge of the grid it was chosen from says only that the optimum lies at
or beyond that edge. This module reads a results folder, selects each optimizer's setting
with the report's rule (:mod:`ddc_bench.report.selection`), and for every optimizer whose
selected lr_mult is the largest (smallest) of its grid adds the lr_mult twice as large
(half as large), up to a stated cap (down to a stated floor); it records every extension
in ``<results>/grid_extensions.jsonl`` and repeats until no selection sits at an edge
that may still move. A selection left at the cap or the floor is reported as such
(:func:`edge_flags`; the paper report prints it beside the number).

    # print the runs that would extend the grid (nothing is run)
    python -m ddc_bench.sweep_extend results/paper-runs/lm_overtrain/cpu --stat best \\
        -- experiment=lm_overtrain
    # run them, select again, and go on until every selection is inside its grid
    python -m ddc_bench.sweep_extend results/paper-runs/lm_overtrain/cpu --stat best \\
        --launch -- experiment=lm_overtrain

The words after ``--`` are the Hydra overrides of the original sweep (its experiment and
scale); each extension runs ``ddc-bench --multirun <overrides> optimizer=O lr_mult=M
seed=<the selected setting's seeds>``, so its runs land in the same results folder.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Default bounds of the extension, as lr_mult (the recipe's lr times 64 or over 64).
DEFAULT_CAP, DEFAULT_FLOOR = 64.0, 1 / 64
#: The record of every extension, in the results folder.
LOG_FILE = "grid_extensions.jsonl"


class ExtendError(ValueError):
    """Bad input to the extension (one-line message)."""


@dataclass(frozen=True)
class Extension:
    """One lr_mult to add for one optimizer, and why (its selection sat at that edge)."""

    optimizer: str
    lr_mult: float
    edge: str            # "high" | "low"
    selected: float      # the lr_mult selected before the extension
    grid: tuple[float, ...]


def edge_of(grid: Sequence[float], selected: float) -> str | None:
    """``"high"``/``"low"`` when ``selected`` is the largest/smallest lr_mult of ``grid``
    (a grid of one point is at both edges: ``"high"``), else None."""
    values = sorted(set(float(x) for x in grid))
    if not values:
        return None
    if math.isclose(selected, values[-1]):
        return "high"
    if math.isclose(selected, values[0]):
        return "low"
    return None


def plan_extensions(grids: dict[str, Sequence[float]], selected: dict[str, float],
                    cap: float = DEFAULT_CAP, floor: float = DEFAULT_FLOOR) -> list[Extension]:
    """The next lr_mult for each optimizer whose selection sits at an edge of its grid:
    twice the largest (at the high edge) while it stays <= ``cap``, half the smallest (at
    the low edge) while it stays >= ``floor``. Optimizers inside their grid, or at a bound,
    get none."""
    out = []
    for opt in sorted(selected):
        grid = sorted(set(float(x) for x in grids.get(opt, ())))
        edge = edge_of(grid, selected[opt])
        if edge == "high" and grid[-1] * 2 <= cap * (1 + 1e-9):
            out.append(Extension(opt, grid[-1] * 2, "high", float(selected[opt]), tuple(grid)))
        elif edge == "low" and grid[0] / 2 >= floor * (1 - 1e-9):
            out.append(Extension(opt, grid[0] / 2, "low", float(selected[opt]), tuple(grid)))
    return out


def edge_flags(grids: dict[str, Sequence[float]], selected: dict[str, float],
               cap: float = DEFAULT_CAP, floor: float = DEFAULT_FLOOR) -> dict[str, str]:
    """Optimizer → a note for each selection at an edge of its grid: ``"at the cap
    (lr_mult M)"`` / ``"at the floor (lr_mult M)"`` when the grid cannot be extended that
    way any more, ``"at the high/low edge of its grid (not extended)"`` otherwise."""
    notes = {}
    for opt, sel in selected.items():
        grid = sorted(set(float(x) for x in grids.get(opt, ())))
        edge = edge_of(grid, sel)
        if edge == "high":
            notes[opt] = (f"at the cap (lr_mult {sel:g})" if sel * 2 > cap * (1 + 1e-9)
                          else f"at the high edge of its grid (lr_mult {sel:g}, not extended)")
        elif edge == "low":
            notes[opt] = (f"at the floor (lr_mult {sel:g})" if sel / 2 < floor * (1 - 1e-9)
                          else f"at the low edge of its grid (lr_mult {sel:g}, not extended)")
    return notes


Selector = Callable[[], tuple[dict[str, list[float]], dict[str, float]]]
Launcher = Callable[[Extension], None]


def extend_until_interior(select: Selector, launch: Launcher, cap: float = DEFAULT_CAP,
                          floor: float = DEFAULT_FLOOR, max_rounds: int = 20,
                          record: Callable[[Extension], None] | None = None
                          ) -> tuple[list[Extension], dict[str, str]]:
    """Select, extend the grids of the optimizers selected at an edge, launch their runs,
    select again, until no extension is left (or ``max_rounds``). ``select()`` returns
    (optimizer → its lr_mult grid, optimizer → its selected lr_mult); ``launch`` runs one
    extension; ``record`` (optional) is called after each launch that returned. Returns the
    extensions made and the final :func:`edge_flags`."""
    if not cap >= 1 >= floor > 0:
        raise ExtendError(f"cap {cap:g} and floor {floor:g}: need cap >= 1 >= floor > 0")
    made: list[Extension] = []
    for _ in range(max_rounds):
        grids, selected = select()
        todo = plan_extensions(grids, selected, cap, floor)
        if not todo:
            return made, edge_flags(grids, selected, cap, floor)
        for ext in todo:
            launch(ext)
            if record is not None:  # after the launch: a failed one is not an extension
                record(ext)
            made.append(ext)
    grids, selected = select()
    return made, edge_flags(grids, selected, cap, floor)


# --------------------------------------------------------------------------------------
# On a results folder
# --------------------------------------------------------------------------------------

def folder_selector(root: Path, metric: str | None = None, stat: str = "final", task: str | None = None
                    ) -> tuple[Selector, Callable[[str], list[int]]]:
    """A :data:`Selector` over the finished runs under ``root`` (the report's selection
    rule, on ``metric`` — default the task's — and ``stat``), and a function giving an
    optimizer's selected seeds. One task: the folder's only one, or ``task`` of several
    (a comparison folder such as results/compare holds one sweep per task)."""
    from ddc_bench.report.loading import load_runs
    from ddc_bench.report.selection import aggregate_task, rows_of, select_best, selection_metric

    state: dict[str, Any] = {}

    def select() -> tuple[dict[str, list[float]], dict[str, float]]:
        df = load_runs(root)
        if df.empty:
            raise ExtendError(f"no finished run under {root}")
        tasks = sorted(map(str, df["task"].unique()))
        if task is not None:
            if task not in tasks:
                raise ExtendError(f"--task {task!r}: no finished run of it under {root} "
                                  f"(its tasks: {', '.join(tasks)})")
            df = df[df["task"] == task]
        elif len(tasks) != 1:
            raise ExtendError(f"{root} holds several tasks ({', '.join(tasks)}): pass --task "
                              f"NAME (one of them) to extend that task's sweep")
        agg = aggregate_task(df)
        m = metric or selection_metric(df)
        if m is None or f"{stat}_{m}__mean" not in agg:
            raise ExtendError(f"metric {m!r} ({stat}) not reported by the runs under {root}")
        chosen = select_best(agg, m, stat)
        grids = {str(o): sorted(float(x) for x in g["lr_mult"].dropna().unique())
                 for o, g in agg.groupby("optimizer")}
        selected = {o: float(agg.loc[i, "lr_mult"]) for o, i in chosen.items()}
        state["seeds"] = {o: sorted(int(s) for s in rows_of(df, agg.loc[i])["seed"])
                          for o, i in chosen.items()}
        return grids, selected

    return select, lambda opt: state.get("seeds", {}).get(opt, [0])


def command_for(ext: Extension, overrides: Sequence[str], seeds: Sequence[int],
                choices: dict[str, str] | None = None) -> list[str]:
    """The ddc-bench command that runs one extension. ``choices`` maps an optimizer's run
    name to the config it was run with where the two differ (grok_depth's DDC-Muon runs
    are named ddc_muon and come from configs/optimizer/ddc_muon_ns.yaml)."""
    choice = (choices or {}).get(ext.optimizer, ext.optimizer)
    return ["ddc-bench", "--multirun", *overrides, f"optimizer={choice}",
            f"lr_mult={ext.lr_mult:g}", "seed=" + ",".join(str(s) for s in seeds)]


def main(argv: list[str] | None = None) -> int:
    """``python -m ddc_bench.sweep_extend`` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m ddc_bench.sweep_extend",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the sweep's results folder")
    parser.add_argument("--cap", type=float, default=DEFAULT_CAP,
                        help=f"largest lr_mult to try (default {DEFAULT_CAP:g})")
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR,
                        help=f"smallest lr_mult to try (default {DEFAULT_FLOOR:g})")
    parser.add_argument("--metric", default=None,
                        help="validation metric to select on (default: the task's)")
    parser.add_argument("--choice", action="append", default=[], metavar="NAME=CONFIG",
                        help="run optimizer NAME's extensions with optimizer=CONFIG (when "
                             "its runs came from a config of another name)")
    parser.add_argument("--stat", default="final", choices=("final", "best"),
                        help="select on the final value or the best over the run")
    parser.add_argument("--task", default=None,
                        help="the task whose sweep to extend, in a folder that holds several "
                             "(give its overrides after -- too, e.g. task=gpt_lm)")
    parser.add_argument("--launch", action="store_true",
                        help="run the extensions (default: print their commands)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"[sweep_extend] error: {args.results} is not a folder (give a sweep's "
              f"results_dir)", file=sys.stderr)
        return 2
    bad = [c for c in args.choice if c.count("=") != 1 or not all(c.split("="))]
    if bad:
        print(f"[sweep_extend] error: --choice {bad[0]!r}: expected NAME=CONFIG, e.g. "
              f"ddc_muon=ddc_muon_ns", file=sys.stderr)
        return 2
    choices = dict(c.split("=") for c in args.choice)
    select, seeds_of = folder_selector(args.results, args.metric, args.stat, args.task)

    def record(ext: Extension) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(ext),
                 "metric": args.metric, "stat": args.stat, "cap": args.cap,
                 "floor": args.floor, "seeds": seeds_of(ext.optimizer),
                 **({"task": args.task} if args.task else {})}
        with open(args.results / LOG_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def launch(ext: Extension) -> None:
        cmd = command_for(ext, overrides, seeds_of(ext.optimizer), choices)
        print("[sweep_extend] " + shlex.join(cmd), flush=True)
        # The running interpreter's ddc_bench, not whatever `ddc-bench` is on PATH (none is
        # when the venv is not activated, as under `make paper-cpu`).
        subprocess.run([sys.executable, "-m", "ddc_bench.cli", *cmd[1:]], check=True)

    try:
        if args.launch:
            made, flags = extend_until_interior(select, launch, args.cap, args.floor,
                                                record=record)
            print(f"[sweep_extend] {len(made)} extension(s) run; log: {args.results / LOG_FILE}")
        else:
            grids, selected = select()
            made = plan_extensions(grids, selected, args.cap, args.floor)
            for ext in made:
                print(shlex.join(command_for(ext, overrides, seeds_of(ext.optimizer), choices)))
            flags = edge_flags(grids, selected, args.cap, args.floor)
            if not made:
                print("[sweep_extend] every selection is inside its grid or at a bound")
        for opt, note in sorted(flags.items()):
            print(f"[sweep_extend] {opt}: selected {note}")
    except ExtendError as err:
        print(f"[sweep_extend] error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"[sweep_extend] error: an extension failed (exit {err.returncode}): "
              f"{shlex.join(err.cmd)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
