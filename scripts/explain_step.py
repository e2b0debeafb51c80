"""Why ``torch.compile(opt.step, fullgraph=True)`` takes long: trace the step of one
optimizer on a task model (built as ``ddc-bench-perf`` builds it) and report.

After ``--warmup`` eager steps (DDC's first step, state init, solves its frame with host
reads), ``torch._dynamo.explain`` traces one step (graphs, graph breaks and their reasons,
operators in the graph, seconds to trace); ``--backend`` then times the first call of
``torch.compile(opt.step, fullgraph=True, backend=...)`` (``aot_eager``: tracing and
AOTAutograd only; ``inductor``: also code generation and the C++ compiler). A diagnosis
script (it uses torch's private ``torch._dynamo`` names, which library code does not).
Usage::

    PYTHONPATH=.:tests OMP_NUM_THREADS=1 python scripts/explain_step.py --optimizer ddc --size small --backend aot_eager
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from ddc_bench.perf import setup as perf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="gpt_lm")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--optimizer", default="ddc")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default=None, help="also time a fullgraph compile with this backend")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = perf.build_task_or_fail(perf.task_config(args.task, args.size))
    batches = perf.take_batches(task, torch.device("cpu"), args.warmup + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = perf.make_setup(task, args.optimizer, torch.device("cpu"))
    opt = getattr(setup.optimizer, "optimizer", setup.optimizer)   # the torch optimizer inside

    def grads(batch: tuple[torch.Tensor, ...]) -> None:
        opt.zero_grad(set_to_none=True)
        task.loss(setup.model, batch)[0].backward()

    for batch in batches[:args.warmup]:
        grads(batch)
        opt.step()
    grads(batches[args.warmup])
    start = time.perf_counter()
    explained = torch._dynamo.explain(opt.step)()
    print(f"{args.optimizer} on {args.task}/{args.size}: explain {time.perf_counter() - start:.1f} s, "
          f"graphs {explained.graph_count}, graph breaks {explained.graph_break_count}, "
          f"ops in graphs {explained.op_count}", flush=True)
    for reason in explained.break_reasons[:10]:
        where = reason.user_stack[-1] if reason.user_stack else None
        print(f"  break: {reason.reason.splitlines()[0][:200]}"
              + (f" at {where.filename.split('/')[-1]}:{where.lineno}" if where else ""))
    if args.backend:
        torch._dynamo.reset()
        step = torch.compile(opt.step, fullgraph=True, backend=args.backend)
        grads(batches[args.warmup + 1])
        start = time.perf_counter()
        step()
        print(f"first fullgraph call with backend {args.backend}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
