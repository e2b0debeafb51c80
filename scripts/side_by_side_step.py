"""Optimizer step times side by side on one task model, interleaved, one process.

Each optimizer trains its own copy of the model (built as ``ddc-bench-perf`` builds it, seed
0); every round computes each one's gradients, then times each one's ``step()``, the order
rotating from round to round, so load on a shared machine hits all alike. Prints the median
step time of each and its ratio to ``adamw_foreach``, with the load average before and
after. ``--old NAME=DIR``: also time DDC from another copy of the ``ddc`` package, copied
into ``DIR/<package>`` under another package name (e.g. ``git show <commit>:ddc/...``
into ``/tmp/old/ddc_old``), built with the options of ``configs/optimizer/NAME.yaml``: the
step before and after a change, under the same load. ``--old`` needs a model whose declared
gauges the old package accepts: the task models declare theirs with the current ``ddc``'s
classes, which an older copy rejects; then run the script from a worktree of each commit
alternately (``PYTHONPATH`` of that worktree) and compare the ratios. Usage::

    PYTHONPATH=.:tests OMP_NUM_THREADS=1 python scripts/side_by_side_step.py \\
        --optimizers adamw_foreach,ddc,muon,ddc_muon --old ddc=/tmp/old/ddc_old --old ddc_muon=/tmp/old/ddc_old
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import warnings

import torch

from ddc_bench.config import load_group_defaults
from ddc_bench.perf import setup as perf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="gpt_lm")
    parser.add_argument("--size", default="small")
    parser.add_argument("--optimizers", default="adamw_foreach,ddc,muon,ddc_muon")
    parser.add_argument("--old", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = perf.build_task_or_fail(perf.task_config(args.task, args.size))
    batches = perf.take_batches(task, torch.device("cpu"))
    setups = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.optimizers.split(","):
            setup = perf.make_setup(task, name, torch.device("cpu"))
            setups.append((name, setup.model, setup.optimizer))
        for spec in args.old:
            name, folder = spec.split("=", 1)
            sys.path.insert(0, os.path.dirname(os.path.abspath(folder)))
            old = importlib.import_module(os.path.basename(os.path.abspath(folder)))
            setup = perf.make_setup(task, "adamw_foreach", torch.device("cpu"))   # the model, seed 0
            options = {k: v for k, v in load_group_defaults("optimizer", name).items() if k != "name"}
            options["betas"] = tuple(options["betas"])
            if "ns_coefficients" in options:
                options["ns_coefficients"] = tuple(options["ns_coefficients"])
            setups.append((f"{name} (old)", setup.model, old.DDC(setup.model, **options)))
    times: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    load_before = os.getloadavg()
    for k in range(args.warmup + args.steps):
        order = setups[k % len(setups):] + setups[:k % len(setups)]
        for name, model, opt in order:
            opt.zero_grad(set_to_none=True)
            task.loss(model, batches[k % len(batches)])[0].backward()
            start = time.perf_counter()
            opt.step()
            if k >= args.warmup:
                times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    ref = statistics.median(times["adamw_foreach"]) if "adamw_foreach" in times else None
    print(f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}; {args.steps} timed steps each")
    print("| optimizer | step ms (median) | IQR ms | vs adamw_foreach |")
    print("|---|---|---|---|")
    for name, values in times.items():
        q = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        ratio = f"{median / ref:.2f}x" if ref else ""
        print(f"| {name} | {1000 * median:.2f} | {1000 * (q[2] - q[0]):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
