"""`python run_all.py ...`: run the benchmark and write the reports. Exit codes: 0 all jobs ok,
1 some job failed or diverged (or the results folder became unwritable), 2 usage or data errors
(nothing was trained), 130 interrupted (finished records are kept; rerun to continue)."""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmark.data import CLASS_NAMES, DATASETS, DataError, load_dataset, resolve_data_root
from benchmark.records import JobKey, ResultsWriteError, existing_record, iter_records, remove_idle_stray_temp_files
from benchmark.reports import write_reports
from benchmark.runner import Job, RunSettings, execute, provenance
from benchmark.splits import PROTOCOLS

PROFILES = ("paper", "quick", "smoke")
MAX_SEED = 2**32 - 1


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_all.py",
        description="Run one-class anomaly detection benchmarks (each class in turn normal) and write "
                    "the paper's Tables 1-4 beside the paper's numbers.")
    parser.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}, or all (required unless --report-only)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="detectors (default: all registered): " + ", ".join(_registry_names()) + ", or pyod:<model>")
    parser.add_argument("--classes", nargs="+", metavar="CLASS", help="normal classes, 0-9 or names (default: all)")
    parser.add_argument("--seeds", nargs="+", metavar="SEED", default=["0"], help="random seeds, 0 <= seed < 2**32 (default: 0)")
    parser.add_argument("--profile", default="paper", help=f"budget: {', '.join(PROFILES)} (default: paper)")
    parser.add_argument("--protocol", default="paper", help=f"split protocol: {', '.join(PROTOCOLS)} (default: paper)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--jobs", default="1", help="jobs in parallel (default: 1)")
    parser.add_argument("--data-root", help="dataset folder (default: $MEMGAN_DATA, else ./data)")
    parser.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    parser.add_argument("--results-dir", default="results", help="where job records go (default: results/)")
    parser.add_argument("--reports-dir", default="reports", help="where tables go (default: reports/)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables from existing records")
    parser.add_argument("--force", action="store_true", help="rerun jobs that already have a record")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD.]PARAM=VALUE",
                        help="override a hyperparameter (e.g. epochs=2, mem_ganomaly.lr=2e-4); results go to "
                             "<profile>+<tag> so they never mix with the profile's own")
    parser.add_argument("--tag", help="name of the results variant for --set runs (default: derived from --set)")
    parser.add_argument("--track-auroc", action="store_true",
                        help="diagnostic: record the test AUROC after every epoch (never used to pick a model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--stack", default="auto", metavar="K",
                        help="train up to K jobs that differ only in class / seed together as one batched model "
                             "(default auto: 1 on the CPU, more on a GPU); deep detectors that support it")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="training precision of the deep detectors: fp32 (default) or bf16 autocast; bf16 "
                             "results go to <profile>+bf16 (not yet shown to leave AUROC unchanged)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the number of jobs and the expected wall time on this device (from a short, "
                             "cached calibration per method), then stop without training")
    return parser


def _registry_names() -> list[str]:
    from methods import REGISTRY

    return list(REGISTRY)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_int(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{what} must be an integer in [{low}, {high}], got {text!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{what} must be an integer in [{low}, {high}], got {value}")
    return value


def _parse_classes(tokens: Optional[list[str]], datasets: list[str]) -> list[int]:
    if not tokens:
        return list(range(10))
    names = {name.lower(): i for d in datasets for i, name in enumerate(CLASS_NAMES[d])}
    classes = []
    for token in tokens:
        if token.isdigit() and int(token) < 10:
            classes.append(int(token))
        elif token.lower() in names:
            classes.append(names[token.lower()])
        else:
            raise UsageError(f"unknown class {token!r}; valid choices: 0-9" + (f" or {', '.join(CLASS_NAMES[datasets[0]])}" if len(datasets) == 1 else ""))
    return sorted(set(classes))


def parse_config(argv: Sequence[str]) -> argparse.Namespace:
    from methods import get_method
    from methods.torch_base import resolve_device

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile not in PROFILES:
        raise UsageError(f"unknown profile {args.profile!r}; valid choices: {', '.join(PROFILES)}")
    if args.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {args.protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    if args.dataset is None and not args.report_only:
        raise UsageError(f"--dataset is required; valid choices: {', '.join(DATASETS)}, all")
    if args.dataset is not None and args.dataset not in (*DATASETS, "all"):
        raise UsageError(f"unknown dataset {args.dataset!r}; valid choices: {', '.join(DATASETS)}, all")
    args.datasets = list(DATASETS) if args.dataset in (None, "all") else [args.dataset]
    args.methods = args.methods or _registry_names()
    for name in args.methods:
        try:
            get_method(name)
        except KeyError as exc:
            raise UsageError(f"unknown method {name!r} ({exc.args[0]}); valid choices: {', '.join(_registry_names())}, "
                             "or pyod:<model> for any pyod model (e.g. pyod:knn)") from None
    args.methods = list(dict.fromkeys(args.methods))
    args.class_ids = _parse_classes(args.classes, args.datasets)
    args.seed_values = sorted({_parse_int(s, "seed", 0, MAX_SEED) for s in args.seeds})
    args.n_jobs = _parse_int(args.jobs, "--jobs", 1, 512)
    args.stack_size = None if args.stack == "auto" else _parse_int(args.stack, "--stack", 1, 256)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.override_map, overrides_flat = _parse_overrides(args.overrides, args.methods)
    args.profile_dir = args.profile
    if args.override_map or args.tag:
        tag = args.tag or "+".join(f"{k}={v}" for k, v in sorted(overrides_flat.items()))
        tag = re.sub(r"[^A-Za-z0-9_.=+-]", "_", tag)
        args.profile_dir = f"{args.profile}+{tag}"
    if args.precision != "fp32":  # never mixed with fp32 results
        args.profile_dir = f"{args.profile_dir}+{args.precision}"
    return args


def _parse_overrides(items: list[str], methods: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """'[method.]param=value' -> ({method: {param: value}}, {as written: value}); each param must
    exist for its method(s)."""
    from methods import get_method

    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    flat: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects [METHOD.]PARAM=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        target, _, param = name.rpartition(".")
        targets = [target] if target else methods
        if target and target not in methods:
            raise UsageError(f"--set {item}: method {target!r} is not among the selected methods ({', '.join(methods)})")
        matched = False
        for method in targets:
            valid = get_method(method).load()().get_params()
            if param in valid:
                per_method[method][param] = _parse_value(text)
                matched = True
            elif target:
                raise UsageError(f"--set {item}: {method} has no hyperparameter {param!r}; valid: {', '.join(sorted(valid))}")
        if not matched:
            raise UsageError(f"--set {item}: no selected method has a hyperparameter {param!r}")
        if param in ("random_state", "device"):
            raise UsageError(f"--set {item}: use --seeds / --device instead")
        flat[name] = _parse_value(text)
    return {m: p for m, p in per_method.items() if p}, flat


def build_jobs(args: argparse.Namespace) -> list[Job]:
    from methods import get_method

    jobs = []
    for dataset in args.datasets:
        for normal_class in args.class_ids:
            for method in args.methods:
                spec = get_method(method)
                cls = spec.load()
                accepted = cls().get_params()
                for seed in args.seed_values:
                    params = {**spec.settings(args.profile, dataset), **args.override_map.get(method, {}), "random_state": seed}
                    if "device" in accepted:
                        params["device"] = args.device
                    key = JobKey(dataset, normal_class, method, seed, args.profile_dir, args.protocol)
                    jobs.append(Job(key, args.profile, params, spec.target))
    return jobs


def validate_jobs(jobs: list[Job]) -> None:
    """Construct each (method, dataset, seed) setting once and check its hyperparameters."""
    from methods import get_method

    seen = set()
    for job in jobs:
        signature = (job.key.method, job.key.dataset, repr(sorted(job.params.items())))
        if signature in seen:
            continue
        seen.add(signature)
        try:
            get_method(job.key.method).load()(**job.params).check_params()
        except (ValueError, TypeError) as exc:
            raise UsageError(f"bad hyperparameters for {job.key.method} on {job.key.dataset}: {exc}") from None


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=directory):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write into the results folder {directory}: {exc.strerror or exc}; "
                         "choose another with --results-dir") from None


def _report(args: argparse.Namespace) -> None:
    for _, _, problem in iter_records(Path(args.results_dir) / args.profile_dir):
        if problem:
            print(f"warning: {problem}; treated as missing in the tables", file=sys.stderr)
    files = write_reports(Path(args.results_dir), Path(args.reports_dir), args.profile_dir, args.protocol)
    print(f"reports written to {Path(args.reports_dir) / args.profile_dir} ({len(files)} files)")


def _print_estimate(args: argparse.Namespace, pending: list[Job], settings: RunSettings) -> int:
    """The expected wall time of the pending jobs (`--estimate`, and before every paper / quick
    run). On a CPU, past an hour, also the quick profile's. Returns the exit code for --estimate."""
    from benchmark.estimate import describe, estimate_jobs, format_seconds
    from benchmark.runner import _limit_threads
    from methods.torch_base import resolve_device

    _limit_threads(settings.threads_per_job)  # calibrate at the thread count the jobs will use
    n_parallel = min(args.n_jobs, max(1, len(pending)))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        estimate = estimate_jobs(pending, args.data_root, not args.no_download, n_parallel, args.device, log)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
        print(f"no estimate: the calibration failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    print(describe(estimate), flush=True)
    if resolve_device(args.device).type == "cpu" and estimate.wall_seconds > 3600 and args.profile != "quick":
        quick_args = parse_config([*args.argv_for_estimate, "--profile", "quick"])
        quick_jobs = build_jobs(quick_args)
        try:
            quick = estimate_jobs(quick_jobs, args.data_root, not args.no_download, n_parallel, args.device, log)
            quick_text = f"about {format_seconds(quick.wall_seconds)} for its {len(quick_jobs)} jobs"
        except Exception as exc:  # noqa: BLE001
            quick_text = f"no estimate ({type(exc).__name__}: {exc})"
        print(f"note: on this CPU the {args.profile} profile takes about {format_seconds(estimate.wall_seconds)}; "
              f"`--profile quick` (CPU budgets, the same jobs) takes {quick_text}. "
              f"A GPU (--device cuda) is the way to the paper's budgets.", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parse_config(argv)
            args.argv_for_estimate = [a for a in argv if a != "--estimate"]
        except SystemExit as exit_:  # argparse: --help (0) or a malformed command line (2)
            return int(exit_.code or 0)
        if args.report_only:
            _report(args)
            return 0
        results_dir = Path(args.results_dir)
        check_writable(results_dir)
        jobs = build_jobs(args)
        validate_jobs(jobs)
        for dataset in args.datasets:  # every data file checked before any training starts
            load_dataset(dataset, args.data_root, download=not args.no_download)
    except UsageError as exc:
        print(f"run_all.py: error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"run_all.py: data error: {exc}", file=sys.stderr)
        return 2

    pending, already, unreadable = [], [], []
    for job in jobs:
        record, problem = (None, None) if args.force else existing_record(results_dir, job.key)
        if problem:
            unreadable.append(problem)
        if record is not None and record["status"] in ("ok", "diverged"):
            already.append(record["status"])
            remove_idle_stray_temp_files(job.key, results_dir)
        else:
            pending.append(job)
    for problem in unreadable:
        print(f"warning: {problem}; the job will be rerun", file=sys.stderr)
    print(f"{len(jobs)} jobs: {len(already)} already recorded, {len(pending)} to run "
          f"(profile {args.profile_dir}, protocol {args.protocol}, data {resolve_data_root(args.data_root)})")
    settings = RunSettings(results_dir=results_dir, data_root=args.data_root, download=not args.no_download,
                           threads_per_job=max(1, (os.cpu_count() or 1) // min(args.n_jobs, max(1, len(pending)))),
                           track_auroc=args.track_auroc, overrides=args.override_map, provenance=provenance(["run_all.py", *argv]),
                           force=args.force, started_at=time.time(), precision=args.precision)
    if args.estimate or (args.profile != "smoke" and pending):
        code = _print_estimate(args, pending, settings)
        if args.estimate:
            return code
    started = time.perf_counter()
    exit_code = 0
    try:
        from benchmark.stacking import auto_stack

        stack = args.stack_size if args.stack_size is not None else auto_stack(args.device)
        outcomes = execute(pending, settings, args.n_jobs, progress=not args.no_progress, stack=stack)
    except KeyboardInterrupt:
        print("\ninterrupted: finished jobs are recorded; run the same command again to do the rest", file=sys.stderr)
        return 130
    except ResultsWriteError as exc:
        print(f"run_all.py: cannot write results: {exc}; records already written are intact", file=sys.stderr)
        return 1
    bad = [o for o in outcomes if o.status in ("failed", "diverged")] + [s for s in already if s == "diverged"]
    print(f"ran {len(outcomes)} jobs in {time.perf_counter() - started:.1f} s: "
          f"{sum(o.status == 'ok' for o in outcomes)} ok, {sum(o.status == 'failed' for o in outcomes)} failed, "
          f"{sum(o.status == 'diverged' for o in outcomes)} diverged")
    if bad:
        exit_code = 1
    try:
        _report(args)
    except OSError as exc:
        print(f"run_all.py: could not write the reports: {exc}; the records are intact, rerun with --report-only",
              file=sys.stderr)
        exit_code = 1
    return exit_code
