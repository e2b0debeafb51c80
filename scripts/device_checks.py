"""Checks of DDC's batched step on an accelerator (issue 11), beside ``ddc-bench-perf``.

    python scripts/device_checks.py equal --device cuda         # batched step == reference there
    python scripts/device_checks.py eigh --device cuda          # what eigh and DDC's step cost there

``equal``: the batched step against the reference step (``foreach=False``), float64, 4
steps, the tiny task models of ``tests/task_models.py`` moved to ``--device``, both bases
(Muon with the exact SVD orthogonaliser) and both rotation solves, as
``tests/test_ddc_foreach.py`` does on the CPU; prints the largest deviation relative to
each parameter's largest entry (the tests' bound: 1e-12 Adam, 1e-11 Muon-SVD).

``eigh``: the time of ``torch.linalg.eigh`` on batches of Gram matrices of head sizes
(on the device, through a host copy, and on the host alone), DDC's step on GPT ``--size``
with eigh on the device and on the host, and torch.profiler's tables of 5 steps (by CPU
time and by device time). Run from the repository root; prints everything it measures.

``results/perf/cuda-*/cuda-check.txt`` and ``cuda-paper-f9f0708/diag-eigh.txt`` came from
earlier, uncommitted copies of these two checks (the same code; the first ``cuda-check``
ran the eigh solve only, on one more GPT variant, ``gpt-tied``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EQUAL_CASES = ("gpt-swiglu-rope-layernorm", "gpt-relu-norope-rmsnorm", "gpt-tied", "grok")


def check_equal(device: torch.device, cases: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from task_models import float64_case
    from test_ddc_foreach import BASES, deviation, logits_loss

    for case in cases:
        model, batches = float64_case(case, None, 4)
        model = model.to(device)
        batches = [tuple(t.to(device) for t in b) for b in batches]
        for base in BASES:
            for solve in ("eigh", "cg"):
                start = time.time()
                worst, runs = deviation(model, batches, logits_loss, base=base, lr=1e-3, weight_decay=0.1,
                                        rotation_solve=solve, **BASES[base])
                print(f"check {device} {case} {base} {solve}: max rel deviation fast vs reference {worst:.2e} "
                      f"rotation residual {runs[1][1].rotation_residual():.1e} ({time.time() - start:.1f}s)", flush=True)


def _timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` after one untimed call, synchronised."""
    from ddc_bench.train import sync

    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def check_eigh(device: torch.device, size: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    from ddc_bench.perf import build_task_or_fail, make_setup, take_batches, task_config
    from ddc_bench.train import sync

    for shape in ((16, 32, 32), (144, 64, 64), (24, 64, 64)):
        for dtype in (torch.float32, torch.float64):
            a = torch.randn(*shape, dtype=dtype, device=device)
            gram = a @ a.transpose(1, 2)
            host = gram.cpu()
            print(f"eigh {shape} {dtype}: {device} {_timed(lambda: torch.linalg.eigh(gram), device):.2f} ms; "
                  f"cpu copy {_timed(lambda: [t.to(device) for t in torch.linalg.eigh(gram.cpu())], device):.2f} ms; "
                  f"cpu only {_timed(lambda: torch.linalg.eigh(host), device):.2f} ms", flush=True)

    task = build_task_or_fail(task_config("gpt_lm", size))
    setup = make_setup(task, "ddc", device)
    loss, _ = task.loss(setup.model, take_batches(task, device, 1)[0])
    loss.backward()
    step = setup.optimizer.step
    print(f"ddc step {size}: {_timed(step, device):.2f} ms", flush=True)
    device_eigh = torch.linalg.eigh

    def host_eigh(x, *args, **kwargs):
        if x.device.type == "cpu":
            return device_eigh(x, *args, **kwargs)
        values, vectors = device_eigh(x.cpu(), *args, **kwargs)
        return values.to(x.device), vectors.to(x.device)

    torch.linalg.eigh = host_eigh
    try:
        print(f"ddc step {size}, eigh on host: {_timed(step, device):.2f} ms", flush=True)
    finally:
        torch.linalg.eigh = device_eigh
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        sync(device)
    averages = prof.key_averages()
    print(averages.table(sort_by="cpu_time_total", row_limit=30))
    if device.type == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=20))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("equal", "eigh"))
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--cases", default=",".join(EQUAL_CASES), help="equal: comma list of tests/task_models.py cases")
    parser.add_argument("--size", default="paper", choices=("tiny", "small", "paper"), help="eigh: GPT size")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    device = torch.device(args.device)
    if args.check == "equal":
        check_equal(device, args.cases.split(","))
    else:
        check_eigh(device, args.size)


if __name__ == "__main__":
    main()
