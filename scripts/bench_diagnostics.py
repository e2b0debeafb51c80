"""Measure ``ddc.diagnostics`` on a task model: readings along a short training run, and
the cost of one reading.

    python scripts/bench_diagnostics.py                          # gpt_lm tiny, 200 steps
    python scripts/bench_diagnostics.py --steps 400 --every 20 --weight-decay 1.0
    python scripts/bench_diagnostics.py --task vit_cifar --set data.dataset=mnist --set model.patch=7 --set model.mlp=relu

For AdamW and DDC-Adam from the same initialisation, on the same batches, at the same
learning rate and weight decay, it trains ``--steps`` steps and every ``--every`` steps
feeds the fixed probe batch to a :class:`ddc.diagnostics.TrajectoryRates`; at the end it
prints the cells (units whose mass fell 2x from its peak) and how many were read, each
layer's participation ratio and low-mass fraction, the ablation readings on a held-out
batch, and the wall time of one ``diagnostics()`` call (median of ``--repeats``) next to
the time of one training step. Nothing is hard-coded: every number is measured, now.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from ddc import DDC
from ddc.diagnostics import TrajectoryRates, ablation, diagnostics, spare_capacity
from tasks import build_task


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _task_cfg(args) -> dict:
    cfg: dict = {"name": args.task, "size": args.size}
    for item in args.set:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _value(value)
    return cfg


def _held_out(task, n: int):
    if callable(getattr(task, "validation_batch", None)):
        x, y = task.validation_batch(torch.device("cpu"))
        return x[:n], y[:n]
    batch = next(task.train_batches(seed=20_000))  # another stream than training and probe
    return batch[0][:n], batch[1][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gpt_lm")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--set", action="append", default=[],
                        help="task config value, e.g. model.mlp=relu (repeatable)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=8, help="probe batch size")
    parser.add_argument("--held-out", type=int, default=256, help="held-out samples of the ablation")
    args = parser.parse_args()

    task = build_task(_task_cfg(args))
    probe = tuple(x[:args.probe] for x in next(task.train_batches(seed=10_000)))
    held_out = _held_out(task, args.held_out)
    print(f"{args.task} {args.size} {args.set}: probe {tuple(probe[0].shape)}, held-out "
          f"{tuple(held_out[0].shape)}, {args.steps} steps, a reading every {args.every}")
    torch.manual_seed(args.seed)
    init = task.build_model()
    for name in ("adamw", "ddc"):
        model = task.build_model()
        model.load_state_dict(init.state_dict())
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            opt = DDC(model, base="adam", lr=args.lr, weight_decay=args.weight_decay)
        trajectory = TrajectoryRates()
        step_times = []
        batches = itertools.islice(task.train_batches(seed=args.seed), args.steps)
        for step, batch in enumerate(batches, start=1):
            start = time.perf_counter()
            loss, _ = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - start)
            if step % args.every == 0:
                trajectory.observe(model, probe[0], step)
        report = trajectory.report()
        val = task.evaluate(model, "val", torch.device("cpu"))["loss"]
        print(f"\n== {name}: val loss {val:.3f}; train step {statistics.median(step_times) * 1e3:.1f} ms")
        print(f"  cells (units whose mass fell 2x): {report.total} of {report.units} units; "
              f"read {report.read}")
        for c in report.cells[:10]:
            print(f"    {c.layer} unit {c.unit}: fell {c.fall:.1f}x, k^ {c.k_hat:.3f} "
                  f"[{c.low:.3f}, {c.high:.3f}] over {c.points} checkpoints{' READ' if c.read else ''}")
        for cap in spare_capacity(model):
            print(f"  {cap.layer:<16} PR {cap.participation_ratio:.1f} of {cap.units} units, "
                  f"{cap.spare_fraction:.3f} below {cap.threshold} x mean mass")
        a = ablation(model, *held_out)
        print(f"  ablation on held-out: loss {a.loss:.4f}; low-mass units ({a.low_fraction:.3f}) "
              f"off: {a.low_delta:+.4f}; units beyond the PR ({a.tail_fraction:.3f}) off: "
              f"{a.tail_delta:+.4f}")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            diagnostics(model, probe, step=args.steps + 1, trajectory=TrajectoryRates(),
                        held_out=held_out)
            times.append(time.perf_counter() - start)
        print(f"  one diagnostics() call with the ablation: {statistics.median(times) * 1e3:.0f} ms "
              f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
