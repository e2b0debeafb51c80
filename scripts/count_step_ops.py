"""Count what one ``optimizer.step()`` dispatches: aten operators and host reads.

For each optimizer (names as ``ddc-bench-perf`` takes them: the reference
``adamw_foreach``, any name of ``ddc_bench.optimizers.registry()`` and perf's variants),
build the task model as ``ddc-bench-perf`` does, train ``--warmup`` steps, then run one more
step under a ``TorchDispatchMode`` that records every aten operator the step dispatches
(foreach ops count once per call, as one kernel launch each; reads of the CPU step counters
apart, see :func:`count_step`) and the host reads among them:
``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``.tolist()``, ``bool(t)`` of a
tensor) and the ops whose output shape depends on the data (``nonzero``,
``masked_select``, ``unique``...). On a GPU each host read is a device synchronisation.
Prints one line per optimizer; ``--out`` also writes them as CSV. Usage::

    PYTHONPATH=.:tests OMP_NUM_THREADS=1 python scripts/count_step_ops.py --optimizers adamw_foreach,ddc,muon,ddc_muon
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings

import torch

from ddc_bench.perf import setup as perf
from ddc_models import HOST_READS, count_step  # tests/ddc_models.py: the counter the tests use


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="gpt_lm")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--optimizers", default="adamw_foreach,ddc,ddc_ref,muon,ddc_muon")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV file to write (never overwritten)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = perf.build_task_or_fail(perf.task_config(args.task, args.size))
    batches = perf.take_batches(task, torch.device("cpu"), args.warmup + 1)
    rows = []
    for name in args.optimizers.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup = perf.make_setup(task, name, torch.device("cpu"))
            for batch in batches:
                setup.optimizer.zero_grad(set_to_none=True)
                task.loss(setup.model, batch)[0].backward()
                if batch is batches[-1]:
                    counter = count_step(setup.optimizer)
                else:
                    setup.optimizer.step()
        top = ", ".join(f"{op} {n}" for op, n in counter.ops.most_common(6))
        reads = {op: n for op, n in counter.ops.items() if op in HOST_READS}
        rows.append({"optimizer": name, "ops": counter.total, "compute_ops": counter.compute,
                     "host_reads": counter.host_reads,
                     "step_counter_reads": counter.counter_reads,
                     "host_read_ops": " ".join(f"{k}={v}" for k, v in sorted(reads.items())), "top_ops": top})
        print(f"{name:16s} ops {counter.total:6d} (not views {counter.compute:6d})  host reads {counter.host_reads:4d}  ({rows[-1]['host_read_ops']})"
              f"  step-counter reads {counter.counter_reads}"
              f"  top: {top}", flush=True)
    if args.out:
        try:
            with open(args.out, "x", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        except FileExistsError:
            sys.exit(f"{args.out} exists; give a new file name")


if __name__ == "__main__":
    main()
