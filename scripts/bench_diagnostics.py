"""Measure ``ddc.diagnostics`` on a task model: readings and the cost of one call.

    python scripts/bench_diagnostics.py                          # gpt_lm tiny, 200 steps
    python scripts/bench_diagnostics.py --size small --steps 100 --repeats 2
    python scripts/bench_diagnostics.py --probe 2          # a smaller (cheaper) probe batch

For a freshly initialised model and for the same model after ``--steps`` training steps with
AdamW and with DDC-Adam (same learning rate and weight decay, same batches), prints the
cells read out of the total, each cell's k̂ (``*`` = read), the spare-capacity fractions,
and the wall time of one ``diagnostics()`` call (median of ``--repeats``) next to the time
of one training step, so the logging interval can be chosen. Nothing is hard-coded: every
number is measured on this machine, now.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from ddc import DDC
from ddc.diagnostics import dead_direction_rates, diagnostics, spare_capacity
from tasks import build_task


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def report(label: str, model: torch.nn.Module, probe, repeats: int) -> None:
    seconds, _ = timed(lambda: diagnostics(model, probe), repeats)
    rates = dead_direction_rates(model, *probe)
    caps = spare_capacity(model)
    print(f"\n== {label}: {rates.read}/{rates.total} cells read; diagnostics() {seconds * 1e3:.0f} ms")
    for layer in dict.fromkeys(c.layer for c in rates.cells):
        cells = [c for c in rates.cells if c.layer == layer]
        row = "  ".join(f"{c.observable}={c.fit.k_hat:.3f}±{c.fit.k_ci:.3f}(R²={c.fit.r2:.4f}){'*' if c.read else ' '}"
                        for c in cells)
        print(f"  {layer:<16} {cells[0].kind:<9} k_pred={cells[0].predicted_k}  {row}")
    for c in caps:
        print(f"  {c.layer:<16} spare {c.spare_fraction:.3f} of {c.units} units "
              f"(mass < {c.threshold} x median), participation ratio {c.participation_ratio:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gpt_lm")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=None,
                        help="probe batch size (default: one training batch)")
    args = parser.parse_args()

    task = build_task({"name": args.task, "size": args.size})
    probe = next(task.train_batches(seed=10_000))  # a fixed probe batch, not a training one
    if args.probe is not None:
        probe = tuple(x[:args.probe] for x in probe)
    print(f"probe batch: inputs {tuple(probe[0].shape)}")
    torch.manual_seed(args.seed)
    init = task.build_model()
    report(f"{args.task} {args.size}, fresh init", init, probe, args.repeats)
    for name in ("adamw", "ddc"):
        model = task.build_model()
        model.load_state_dict(init.state_dict())
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            opt = DDC(model, base="adam", lr=args.lr, weight_decay=args.weight_decay)
        step_times = []
        for batch in itertools.islice(task.train_batches(seed=args.seed), args.steps):
            start = time.perf_counter()
            loss, _ = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - start)
        val = task.evaluate(model, "val", torch.device("cpu"))["loss"]
        report(f"after {args.steps} {name} steps (lr {args.lr}, wd {args.weight_decay}; "
               f"val loss {val:.3f}; train step {statistics.median(step_times) * 1e3:.1f} ms)",
               model, probe, args.repeats)


if __name__ == "__main__":
    main()
