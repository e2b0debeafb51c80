"""Measure DDC's optimizer-state memory and step time against AdamW (and DDC-Muon against Muon).

    python scripts/bench_ddc.py                      # GPT small on the CPU
    python scripts/bench_ddc.py --task vit_cifar --size tiny --data-root data

Prints one row per optimizer:

* state bytes: the tensors in ``optimizer.state``, plus DDC's per-gauge log-scale vectors;
* the ratio to AdamW's state and how much of it is per-row/column vectors;
* ``optimizer.step()`` time (median over the timed steps, after warm-up) and its ratio to
  AdamW's;
* forward + backward + step time, for scale.

Numbers are measured on this machine, now: nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ddc_bench.optimizers import build_optimizer
from tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of per-parameter state tensors, bytes of DDC's per-gauge vectors)."""
    tensors = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                  for t in s.values() if isinstance(t, torch.Tensor))
    vectors = sum(t.numel() * t.element_size() for t in getattr(optimizer, "_log_scales", []))
    return tensors, vectors


def measure(task, name: str, batches: list, warmup: int, timed: int) -> dict:
    torch.manual_seed(0)
    model = task.build_model()
    options = OmegaConf.to_container(OmegaConf.load(CONFIGS / "optimizer" / f"{name}.yaml"))
    optimizer = build_optimizer(model, options)
    step_times, iter_times = [], []
    for i, batch in enumerate(batches[: warmup + timed]):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, batch)
        loss.backward()
        before_step = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        if i >= warmup:
            step_times.append(end - before_step)
            iter_times.append(end - start)
    tensors, vectors = state_bytes(optimizer)
    return {"name": name, "state": tensors + vectors, "vectors": vectors,
            "step_ms": 1e3 * statistics.median(step_times), "iter_ms": 1e3 * statistics.median(iter_times),
            "params": sum(p.numel() for p in model.parameters()), "loss": float(loss),
            "sweeps": getattr(optimizer, "last_balance_sweeps", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gpt_lm")
    parser.add_argument("--size", default="small")
    parser.add_argument("--data-root", default=None, help="CIFAR root for the CIFAR tasks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--optimizers", default="adamw,ddc,muon,ddc_muon")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = OmegaConf.load(CONFIGS / "task" / f"{args.task}.yaml")
    cfg.size = args.size
    if args.data_root:
        cfg.data.root = args.data_root
    task = build_task(cfg)
    batches = list(itertools.islice(task.train_batches(0), args.warmup + args.steps))
    rows = [measure(task, name, batches, args.warmup, args.steps) for name in args.optimizers.split(",")]

    reference = {r["name"]: r for r in rows}
    print(f"task={args.task} size={args.size} params={rows[0]['params']:,} threads={torch.get_num_threads()} "
          f"device=cpu steps timed={args.steps} (median)")
    print(f"{'optimizer':<10} {'state MB':>9} {'vs AdamW':>9} {'vectors KB':>11} {'step ms':>9} "
          f"{'vs base':>8} {'iter ms':>9}  balance sweeps (start, after)")
    for r in rows:
        base = "muon" if r["name"] == "ddc_muon" else "adamw"
        adamw = reference.get("adamw")
        mem_ratio = f"{r['state'] / adamw['state']:.3f}x" if adamw else "-"
        time_ratio = (f"{r['step_ms'] / reference[base]['step_ms']:.2f}x"
                      if base in reference and r["name"] != base else "-")
        print(f"{r['name']:<10} {r['state'] / 2**20:>9.2f} {mem_ratio:>9} {r['vectors'] / 2**10:>11.1f} "
              f"{r['step_ms']:>9.1f} {time_ratio:>8} {r['iter_ms']:>9.1f}  {r['sweeps'] or ''}")


if __name__ == "__main__":
    main()
