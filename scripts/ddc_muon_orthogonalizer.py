"""DDC-Muon's two orthogonalisers on the harness's GPT (``gpt_lm``): step cost and exactness.

* Step time: ``optimizer.step()`` of the harness's ``ddc_muon`` (``configs/optimizer/ddc_muon.yaml``)
  with ``orthogonalizer="svd"`` and with ``"newton_schulz"``, and of the ``muon`` baseline,
  float32, each on its own copy of the model (seed 0), interleaved step by step (so load
  changes hit all three alike), median of ``--steps`` after ``--warmup``.
* Equivariance: max relative deviation of 10 float64 steps from θ and from g·θ under random
  elements of the model's declared gauges (``tests/ddc_models.equivariance_deviation``), for
  both orthogonalisers and for the Muon baseline, with ddc_muon.yaml's hyperparameters.

The load average (``os.getloadavg``) is printed beside the timings. Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=.:tests python scripts/ddc_muon_orthogonalizer.py [--size small]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ddc_bench.config import load_group_defaults  # noqa: E402
from ddc_bench.optimizers import build_optimizer  # noqa: E402
from ddc_bench.perf.setup import build_task_or_fail, take_batches, task_config  # noqa: E402
from ddc_models import equivariance_deviation  # noqa: E402

ORTHOGONALIZERS = ("svd", "newton_schulz")


def ddc_muon(model: torch.nn.Module, orthogonalizer: str) -> torch.optim.Optimizer:
    options = {**load_group_defaults("optimizer", "ddc_muon"), "orthogonalizer": orthogonalizer}
    return build_optimizer(model, options).optimizer


def muon(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(model, load_group_defaults("optimizer", "muon")).optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = build_task_or_fail(task_config("gpt_lm", args.size))
    batches = take_batches(task, torch.device("cpu"))
    loss_fn = lambda m, b: task.loss(m, b)[0]  # noqa: E731

    makers = {"muon": muon, **{f"ddc_muon {o}": (lambda m, o=o: ddc_muon(m, o)) for o in ORTHOGONALIZERS}}
    setups = {}
    for label, make in makers.items():
        torch.manual_seed(0)
        model = task.build_model()
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setups[label] = (model, make(model), [])
    print(f"gpt_lm {args.size}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        for model, optimizer, times in setups.values():
            optimizer.zero_grad()
            loss_fn(model, batch).backward()
            start = time.perf_counter()
            optimizer.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    median = {label: statistics.median(times) for label, (_, _, times) in setups.items()}
    load = os.getloadavg()[0]
    for label, seconds in median.items():
        print(f"step {label:22s} {1e3 * seconds:8.1f} ms   {seconds / median['muon']:.2f}x muon   "
              f"(median of {args.steps}; load average {load:.2f})")
    print(f"step ddc_muon svd / newton_schulz: {median['ddc_muon svd'] / median['ddc_muon newton_schulz']:.2f}x",
          flush=True)

    torch.manual_seed(0)
    model64 = task.build_model().double()
    select = lambda m: m.gauges()  # noqa: E731
    kinds = sorted({type(g).__name__ for g in select(model64)})
    print(f"equivariance: 10 float64 steps, random elements of the declared gauges ({', '.join(kinds)})")
    for label, make in {**{f"ddc_muon {o}": (lambda m, g, o=o: ddc_muon(m, o)) for o in ORTHOGONALIZERS},
                        "muon": lambda m, g: muon(m)}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deviation = equivariance_deviation(copy.deepcopy(model64), make, lambda m, b: (loss_fn(m, b), None),
                                               batches[:10] if len(batches) >= 10 else (batches * 2)[:10], select)
        print(f"deviation {label:22s} {deviation:.1e}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
