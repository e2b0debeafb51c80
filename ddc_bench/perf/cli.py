"""The ``ddc-bench-perf`` command: arguments, then the measurements, then the report."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddc_bench import provenance, results
from ddc_bench.config import ConfigError
from ddc_bench.optimizers import registry
from ddc_bench.perf.measure import measure_overhead, measure_scaling, measure_task, profile_step
from ddc_bench.perf.report import OUTPUT_FILES, load_average, markdown, steps_table, write_report
from ddc_bench.perf.setup import (ADAMW_COMPILED, REFERENCE, TASK_NAMES, VARIANTS, PerfError,
                                  build_task_or_fail, task_config)


def parse_scale(spec: str, default_size: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``tiny,small,small:width=256`` → [(label, size, task.model overrides), ...]."""
    from tasks import SIZES

    entries = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        size, *pairs = item.split(":")
        size = size or default_size
        if size not in SIZES:
            raise PerfError(f"--scale entry {item!r}: unknown size {size!r}; accepted: {', '.join(SIZES)}")
        overrides: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise PerfError(f"--scale entry {item!r}: expected SIZE[:KEY=VALUE...], e.g. small:width=256")
            overrides[key] = int(value) if value.lstrip("-").isdigit() else value
        entries.append((item, size, overrides))
    if not entries:
        raise PerfError("--scale is empty; give sizes like tiny,small,small:width=256")
    return entries


def _parse_names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise PerfError(f"unknown {what} {', '.join(unknown) or '(none given)'}; accepted: {', '.join(known)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The ``ddc-bench-perf`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ddc-bench-perf", description="Optimizer step time, state memory, peak memory and "
        "training-step time per task model, with ratios to torch's AdamW; plus scaling and harness overhead.")
    parser.add_argument("--tasks", default="gpt_lm", help=f"comma list of {', '.join(TASK_NAMES)}, or all")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--optimizers", default="adamw,ddc,muon,ddc_muon",
                        help="comma list of harness optimizers (the reference AdamW row is always added); "
                        "ddc_ref / ddc_muon_ref: DDC's reference step (foreach=False)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per optimizer (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data-root", default=None, help="CIFAR folder for the CIFAR tasks (default: their config's)")
    parser.add_argument("--scale", default="tiny,small,small:width=256",
                        help="model sizes for the scaling run: SIZE[:KEY=VALUE...] with task.model overrides")
    parser.add_argument("--scale-task", default="gpt_lm", choices=TASK_NAMES)
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling run")
    parser.add_argument("--overhead-steps", type=int, default=30,
                        help="timed steps of the harness and of the bare loop (0: skip the overhead measurement)")
    parser.add_argument("--overhead-optimizers", default="adamw,ddc")
    parser.add_argument("--profile", default=None, metavar="OPTIMIZER",
                        help="also write torch.profiler's table of this optimizer's step (first task)")
    parser.add_argument("--out", default=None, help="output folder (default: results/perf/<device>-<size>-<UTC time>; "
                        "existing files are never overwritten)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`PerfError` for a value argparse cannot check."""
    for key, low in (("steps", 1), ("warmup", 0), ("threads", 0), ("overhead_steps", 0)):
        if getattr(args, key) < low:
            raise PerfError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {getattr(args, key)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PerfError("--device cuda but CUDA is not available here; use --device cpu")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ddc-bench-perf`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run_perf(args, command=" ".join(["ddc-bench-perf", *argv]))
    except (PerfError, ConfigError, results.RunExistsError) as err:
        print(f"ddc-bench-perf: error: {err}", file=sys.stderr)
        sys.exit(2)


def run_perf(args: argparse.Namespace, command: str = "ddc-bench-perf") -> dict[str, list[dict[str, Any]]]:
    """Measure everything ``args`` asks for, print the tables, write the files; return the rows.

    ``command`` is the command line recorded in ``report.md``."""
    check_args(args)
    known = sorted(registry()) + list(VARIANTS) + [ADAMW_COMPILED]
    tasks = list(TASK_NAMES) if args.tasks == "all" else _parse_names(args.tasks, TASK_NAMES, "task(s)")
    names = _parse_names(args.optimizers, known, "optimizer(s)")
    overhead_names = _parse_names(args.overhead_optimizers, sorted(registry()), "overhead optimizer(s)") \
        if args.overhead_steps else []
    scale = parse_scale(args.scale, args.size) if not args.no_scaling else []
    if args.profile is not None:
        _parse_names(args.profile, known + list(REFERENCE.values()), "--profile optimizer")
    started = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out or f"results/perf/{args.device}-{args.size}-{started:%Y%m%d-%H%M%S}")
    existing = [str(out / f) for f in OUTPUT_FILES if (out / f).exists()]
    if existing:
        raise PerfError(f"{existing[0]} already exists (a previous run's results are never "
                        "overwritten); move it away or pass another --out")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    reference = REFERENCE[device.type]
    prov = provenance.collect(device, started)
    all_names = [reference] + [n for n in names if n != reference]
    header = (f"device: {prov['device']}; torch {torch.__version__}; threads {threads}; "
              f"git {str(prov['git_commit'])[:10]}{' (dirty)' if prov['git_dirty'] else ''}; {started:%Y-%m-%d %H:%M} UTC"
              f"; load average at start {load_average()}")
    print(f"[ddc-bench-perf] {header}")

    step_rows: list[dict[str, Any]] = []
    overhead_rows: list[dict[str, Any]] = []
    profile_text = None
    for i, name in enumerate(tasks):
        cfg = task_config(name, args.size, args.data_root)
        task = build_task_or_fail(cfg)
        print(f"[ddc-bench-perf] {name}-{args.size}: {len(all_names)} optimizers x "
              f"{args.warmup}+{args.steps} steps, round-robin", flush=True)
        rows = measure_task(task, cfg, all_names, device, args.steps, args.warmup)
        step_rows += rows
        print(markdown(steps_table(rows)), flush=True)
        if i == 0 and overhead_names:
            print(f"[ddc-bench-perf] harness overhead on {name}-{args.size}: {args.warmup}+"
                  f"{args.overhead_steps} steps, runner and bare loop interleaved", flush=True)
            overhead_rows = measure_overhead(task, cfg, overhead_names, device, args.overhead_steps,
                                             args.warmup, args.threads)
        if i == 0 and args.profile:
            profile_text = profile_step(task, args.profile, device)
            print(profile_text, flush=True)
        del task
        gc.collect()

    scale_rows: list[dict[str, Any]] = []
    if scale:
        print(f"[ddc-bench-perf] scaling on {args.scale_task}: {', '.join(e[0] for e in scale)}", flush=True)
        scale_rows = measure_scaling(args.scale_task, scale, [reference, "ddc"], device, args.steps,
                                     args.warmup, args.data_root)

    write_report(out, args, command, header, reference, device, prov, step_rows, overhead_rows,
                 scale_rows, profile_text)
    return {"steps": step_rows, "overhead": overhead_rows, "scaling": scale_rows}
