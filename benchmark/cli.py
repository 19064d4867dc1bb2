"""`memgan-bench ...` or `python run_all.py ...`: run the benchmark and write the reports. Exit
codes: 0 all jobs ok, 1 some job failed, diverged or was lost with its worker process (or the results folder
became unwritable), 2 usage or data errors (nothing was trained), 130 interrupted (finished records are kept;
rerun to continue)."""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmark import __version__
from benchmark.backends import BACKENDS, BackendUnavailable
from benchmark.data import CLASS_NAMES, DATASETS, DataError, load_dataset, resolve_data_root
from benchmark.datasets import did_you_mean
from benchmark.estimate import describe, estimate_jobs, format_seconds, job_precision
from benchmark.jobs import DEFAULT_VAL_FRACTION, NOT_STARTED, Job, JobOutcome, RunSettings, limit_threads
from benchmark.profiles import PROFILE_NAMES
from benchmark.records import (
    JobKey,
    ResultsWriteError,
    existing_record,
    iter_records,
    missing_folders,
    remove_empty_folders,
    remove_idle_stray_temp_files,
)
from benchmark.reports import write_reports
from benchmark.runner import execute, provenance
from benchmark.splits import PROTOCOLS
from benchmark.stacking import stack_size
from benchmark.sweeps import SweepSpec, write_sensitivity
from benchmark.sweeps import set_tag as sweep_set_tag
from methods import REGISTRY, get_method
from methods.base import PRECISIONS, TrainOptions, resolve_device

PROFILES = PROFILE_NAMES
MAX_SEED = 2**32 - 1


class UsageError(Exception):
    """A command-line usage error: the CLI prints it and exits with status 2."""
    pass


def prog_name() -> str:
    """The program name in usage and error messages: how it was started (``run_all.py``,
    ``memgan-bench``), ``memgan-bench`` when that is not a script name."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("__main__.py", "-c", "-m") else "memgan-bench"


def package_version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    try:
        return metadata.version("memgan-bench")
    except metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog=prog_name(),
        description="Run one-class anomaly detection benchmarks (each class in turn normal) and write "
                    "the paper's Tables 1-4 beside the paper's numbers.")
    parser.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}, or all (required unless --report-only)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="detectors (default: all registered): " + ", ".join(_registry_names())
                        + ", or pyod:<model>")
    parser.add_argument("--classes", nargs="+", metavar="CLASS", help="normal classes, 0-9 or names (default: all)")
    parser.add_argument("--seeds", nargs="+", metavar="SEED", default=["0"],
                        help="random seeds, 0 <= seed < 2**32 (default: 0)")
    parser.add_argument("--profile", default="paper", help=f"budget: {', '.join(PROFILES)} (default: paper)")
    parser.add_argument("--protocol", default="paper", help=f"split protocol: {', '.join(PROTOCOLS)} (default: paper)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--jobs", default="1", help="jobs in parallel (default: 1)")
    parser.add_argument("--threads", metavar="N",
                        help="torch / BLAS threads of each job (default: this machine's cores / --jobs; on a Dask "
                             "cluster, each worker host's cores / the Dask threads of its workers). Results are "
                             "bit-identical only at one thread count, so reports name records made at another")
    parser.add_argument("--backend", default="local", help="where jobs run: local (worker processes of this machine) "
                        "or dask (a Dask cluster: --scheduler's, else a local one of --jobs workers) (default: local)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="with --backend dask: the scheduler to use (e.g. tcp://host:8786)")
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
    parser.add_argument("--sweep", action="append", default=[], metavar="METHOD.PARAM=V1,V2,...",
                        help="sensitivity sweep: run METHOD once per value "
                             "(results in <profile>+sweep-METHOD.PARAM=V), "
                             "then write a sensitivity table and figure; one --sweep per run")
    parser.add_argument("--track-auroc", action="store_true",
                        help="diagnostic: record the test AUROC after every epoch (never used to pick a model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--val-fraction", default=str(DEFAULT_VAL_FRACTION),
                        help="share of the normal training images held out to set a threshold without test labels, "
                             f"in [0, 0.5] (default {DEFAULT_VAL_FRACTION:g}: train on all of them, as the paper); "
                             "another value (e.g. 0.1) is an opt-in held-out run whose records go to <profile>+val<f>")
    parser.add_argument("--stack", default="auto", metavar="K",
                        help="train up to K jobs that differ only in class / seed together as one batched model "
                             "(default auto: 1 on the CPU, more on a GPU); deep detectors that support it")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="training precision of the deep detectors: auto (default: bf16 autocast for the "
                             "detectors whose bf16 AUROC was measured within seed noise of fp32 and faster, on a "
                             "device with native bf16; fp32 for the rest; README 'Precision and memory format'), "
                             "fp32 (all), or bf16 (all; results go to <profile>+bf16). Each record says its "
                             "precision; a results folder never holds one detector in two precisions")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on a GPU: capture each training step of the deep detectors in a CUDA graph (one "
                             "launch per step instead of hundreds); not yet measured")
    parser.add_argument("--estimate", action="store_true",
                        help="print the number of jobs and the expected wall time on this device (from a short, "
                             "cached calibration per method), then stop without training")
    return parser


def _registry_names() -> list[str]:
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


def _parse_classes(tokens: Optional[list[str]], datasets: list[str]) -> Optional[list[int]]:
    """The --classes given (each must exist in every selected dataset), or None: every class of each
    dataset (datasets may have different class counts)."""
    n_classes = min(len(CLASS_NAMES[d]) for d in datasets)
    if not tokens:
        return None
    names = {name.lower(): i for d in datasets for i, name in enumerate(CLASS_NAMES[d])}
    classes = []
    for token in tokens:
        if token.isdigit() and int(token) < n_classes:
            classes.append(int(token))
        elif token.lower() in names:
            classes.append(names[token.lower()])
        else:
            named = f" or {', '.join(CLASS_NAMES[datasets[0]])}" if len(datasets) == 1 else ""
            raise UsageError(f"unknown class {token!r}; valid choices: 0-{n_classes - 1}{named}"
                             f"{did_you_mean(token, [n for d in datasets for n in CLASS_NAMES[d]])}")
    return sorted(set(classes))


def parse_config(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check the command line.

    Parameters
    ----------
    argv : sequence of str
        The arguments (without the program name).

    Returns
    -------
    argparse.Namespace
        The checked configuration.

    Raises
    ------
    UsageError
        On an unknown profile, protocol, dataset or method, a missing --dataset, a bad --val-fraction, or a
        bad --sweep / --set.
    SystemExit
        From argparse, on --help or a malformed command line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile not in PROFILES:
        raise UsageError(f"unknown profile {args.profile!r}; valid choices: {', '.join(PROFILES)}"
                         f"{did_you_mean(args.profile, PROFILES)}")
    if args.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {args.protocol!r}; valid choices: {', '.join(PROTOCOLS)}"
                         f"{did_you_mean(args.protocol, PROTOCOLS)}")
    if args.dataset is None and not args.report_only:
        raise UsageError(f"--dataset is required; valid choices: {', '.join(DATASETS)}, all")
    if args.dataset is not None and args.dataset not in (*DATASETS, "all"):
        raise UsageError(f"unknown dataset {args.dataset!r}; valid choices: {', '.join(DATASETS)}, all"
                         f"{did_you_mean(args.dataset, [*DATASETS, 'all'])}")
    args.datasets = list(DATASETS) if args.dataset in (None, "all") else [args.dataset]
    try:
        args.val_fraction = float(args.val_fraction)
    except ValueError:
        raise UsageError(f"--val-fraction must be a number in [0, 0.5], got {args.val_fraction!r}") from None
    if not 0.0 <= args.val_fraction <= 0.5:
        raise UsageError(f"--val-fraction must be in [0, 0.5], got {args.val_fraction}")
    val_tag = "" if args.val_fraction == DEFAULT_VAL_FRACTION else f"+val{args.val_fraction:g}"
    args.val_tag = val_tag
    if args.report_only and not args.overrides and not args.tag and not args.sweep:
        # The reports need no detector code: no detector module (or torch) is imported, so this starts fast.
        args.profile_dir = args.profile + val_tag
        args.sweep_spec = None
        return args
    args.sweep_spec = _parse_sweep(args)
    args.methods = args.methods or _registry_names()
    for name in args.methods:
        try:
            get_method(name)
        except KeyError as exc:
            # A pyod name's KeyError carries pyod's reason; a plain unknown name's carries the name itself.
            reason = str(exc.args[0]) if exc.args else ""
            detail = f" ({reason})" if reason and reason != name else ""
            raise UsageError(f"unknown method {name!r}{detail}; valid choices: {', '.join(_registry_names())}, "
                             "or pyod:<model> for any pyod model (e.g. pyod:knn)"
                             f"{did_you_mean(name, _registry_names())}") from None
    args.methods = list(dict.fromkeys(args.methods))
    args.class_ids = _parse_classes(args.classes, args.datasets)
    args.seed_values = sorted({_parse_int(s, "seed", 0, MAX_SEED) for s in args.seeds})
    args.n_jobs = _parse_int(args.jobs, "--jobs", 1, 512)
    args.n_threads = None if args.threads is None else _parse_int(args.threads, "--threads", 1, 1024)
    args.stack_size = None if args.stack == "auto" else _parse_int(args.stack, "--stack", 1, 256)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, but this run's device is {device} "
                         "(--device cuda on a machine with a GPU); drop the flag here")
    if args.cuda_graphs and args.precision == "bf16":  # under "auto", graphed jobs train in fp32
        # bf16 steps stack (methods/engine/), but no GPU has been lent to capture one in a graph yet.
        raise UsageError(f"--cuda-graphs runs in fp32 only (a bf16 step has not been captured and checked on "
                         f"a GPU yet); drop --cuda-graphs or --precision {args.precision}")
    _check_backend(args)
    args.override_map, overrides_flat = _parse_overrides(args.overrides, args.methods)
    args.profile_dir = args.profile
    if args.sweep_spec is not None:
        spec = args.sweep_spec
        if spec.param in args.override_map.get(spec.method, {}):
            raise UsageError(f"--sweep {spec.name} and --set {spec.name}: the swept parameter cannot also be set")
        # A non-default --val-fraction goes into the sweep's directory names too.
        args.sweep_tag = "+".join(filter(None, [sweep_set_tag(overrides_flat, args.tag), val_tag.lstrip("+"),
                                                "" if args.precision != "bf16" else args.precision]))
    elif args.override_map or args.tag:
        tag = args.tag or "+".join(f"{k}={v}" for k, v in sorted(overrides_flat.items()))
        tag = re.sub(r"[^A-Za-z0-9_.=+-]", "_", tag)
        args.profile_dir = f"{args.profile}+{tag}"
    if args.sweep_spec is None:
        args.profile_dir += val_tag
        if args.precision == "bf16":  # the all-bf16 experiment; "auto" and "fp32" runs share <profile>
            args.profile_dir = f"{args.profile_dir}+{args.precision}"
    return args


def _parse_sweep(args: argparse.Namespace) -> Optional[SweepSpec]:
    """The --sweep spec (one per run); with it, --methods defaults to (and may only be) its method."""
    if not args.sweep:
        return None
    if len(args.sweep) > 1:
        raise UsageError(f"one --sweep per run, got {len(args.sweep)}: {', '.join(args.sweep)}; "
                         "run them one after another")
    spec = parse_sweep(args.sweep[0], args.profile)
    if args.methods and list(dict.fromkeys(args.methods)) != [spec.method]:
        raise UsageError(f"--sweep {spec.name} runs only {spec.method}; drop --methods or give --methods {spec.method}")
    args.methods = [spec.method]
    return spec


def parse_sweep(text: str, profile: str = "paper") -> SweepSpec:
    """Parse 'METHOD.PARAM=v1,v2,...' and check the method and its parameter exist.

    Parameters
    ----------
    text : str
        The --sweep argument.
    profile : str, default="paper"
        The run's profile: the spec carries its own value of the parameter per dataset.

    Returns
    -------
    SweepSpec
        The values as written and parsed, the method's label and the profile's values.

    Raises
    ------
    UsageError
        Saying what is wrong and what a valid specification looks like.
    """
    example = "e.g. --sweep mem_ganomaly.lr=2e-3,1e-3,5e-4"
    name, sep, values_text = text.partition("=")
    method, dot, param = name.rpartition(".")
    if not sep or not dot or not method or not param:
        raise UsageError(f"--sweep expects METHOD.PARAM=v1,v2,..., got {text!r} ({example})")
    try:
        spec = get_method(method)
    except KeyError:
        raise UsageError(f"--sweep {text}: unknown method {method!r}; valid: {', '.join(REGISTRY)}") from None
    valid = spec.load()().get_params()
    if param in ("random_state", "device"):
        raise UsageError(f"--sweep {text}: use --seeds / --device for {param}")
    if param not in valid:
        raise UsageError(f"--sweep {text}: {method} has no hyperparameter {param!r}; "
                         f"valid: {', '.join(sorted(valid))}")
    values = tuple(v.strip() for v in values_text.split(","))
    if not values_text.strip() or any(not v for v in values):
        raise UsageError(f"--sweep {text}: empty value in {values_text!r}; give comma-separated values ({example})")
    if len(set(values)) != len(values):
        raise UsageError(f"--sweep {text}: a value is repeated")
    profile_values = {}
    for dataset in DATASETS:
        try:
            profile_values[dataset] = spec.settings(profile, dataset).get(param, valid[param])
        except (KeyError, ValueError):  # no settings of this profile for the dataset
            continue
    return SweepSpec(method, param, values, tuple(_parse_value(v) for v in values), spec.label, profile_values)


def sweep_variants(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One configuration per swept value.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed configuration.

    Returns
    -------
    list of argparse.Namespace
        One per swept value (its own profile directory and overrides); [args] itself without --sweep.
    """
    spec = args.sweep_spec
    if spec is None:
        return [args]
    variants = []
    for text, value in zip(spec.values, spec.parsed_values()):
        variant = argparse.Namespace(**vars(args))
        variant.override_map = {spec.method: {**args.override_map.get(spec.method, {}), spec.param: value}}
        variant.profile_dir = spec.profile_dir(args.profile, text, args.sweep_tag)
        variants.append(variant)
    return variants


def _check_backend(args: argparse.Namespace) -> None:
    backend = BACKENDS.get(args.backend)
    if backend is None:
        raise UsageError(f"unknown backend {args.backend!r}; valid choices: {', '.join(BACKENDS)}")
    if args.scheduler and not backend.cluster:
        raise UsageError(f"--scheduler needs --backend {' or '.join(n for n, b in BACKENDS.items() if b.cluster)}")
    if not backend.available():
        raise UsageError(backend.missing)


def _parse_overrides(items: list[str], methods: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """'[method.]param=value' -> ({method: {param: value}}, {as written: value}); each param must
    exist for its method(s)."""
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    flat: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects [METHOD.]PARAM=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        target, _, param = name.rpartition(".")
        targets = [target] if target else methods
        if target and target not in methods:
            raise UsageError(f"--set {item}: method {target!r} is not among the selected methods "
                             f"({', '.join(methods)})")
        matched = False
        for method in targets:
            valid = get_method(method).load()().get_params()
            if param in valid:
                per_method[method][param] = _parse_value(text)
                matched = True
            elif target:
                raise UsageError(f"--set {item}: {method} has no hyperparameter {param!r}; "
                                 f"valid: {', '.join(sorted(valid))}")
        if not matched:
            raise UsageError(f"--set {item}: no selected method has a hyperparameter {param!r}")
        if param in ("random_state", "device"):
            raise UsageError(f"--set {item}: use --seeds / --device instead")
        flat[name] = _parse_value(text)
    return {m: p for m, p in per_method.items() if p}, flat


def build_jobs(args: argparse.Namespace) -> list[Job]:
    """The jobs of a configuration: every dataset x class x method x seed.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed configuration.

    Returns
    -------
    list of Job
        The jobs.

    Raises
    ------
    UsageError
        When a method has no settings for the profile and dataset.
    """
    jobs = []
    for dataset in args.datasets:
        classes = args.class_ids if args.class_ids is not None else range(len(CLASS_NAMES[dataset]))
        for normal_class in classes:
            for method in args.methods:
                spec = get_method(method)
                cls = spec.load()
                accepted = cls().get_params()
                try:
                    settings = spec.settings(args.profile, dataset)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
                for seed in args.seed_values:
                    params = {**settings, **args.override_map.get(method, {}), "random_state": seed}
                    if "device" in accepted:
                        params["device"] = args.device
                    key = JobKey(dataset, normal_class, method, seed, args.profile_dir, args.protocol)
                    jobs.append(Job(key, args.profile, params, spec.target, spec.label))
    return jobs


def validate_jobs(jobs: list[Job]) -> None:
    """Construct each (method, dataset, seed) setting once and check its hyperparameters.

    Parameters
    ----------
    jobs : list of Job
        The jobs.

    Raises
    ------
    UsageError
        When a setting's hyperparameters are bad.
    """
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


def check_writable(directory: Path) -> list[Path]:
    """Create the results folder and probe it; on failure remove the folders it created.

    Parameters
    ----------
    directory : Path
        The results folder.

    Returns
    -------
    list of Path
        The folders it created (deepest first), for `remove_empty_folders` when the run then stops
        before writing anything.

    Raises
    ------
    UsageError
        When the folder cannot be created or written.
    """
    created = missing_folders(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=directory):
            pass
    except OSError as exc:
        remove_empty_folders(created)
        raise UsageError(f"cannot write into the results folder {directory}: {exc.strerror or exc}; "
                         "choose another with --results-dir") from None
    return created


def _report(args: argparse.Namespace, report_only: bool = False) -> int:
    """Write the reports of every variant (and a sweep's sensitivity table).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed configuration.
    report_only : bool, default=False
        A --report-only run: a write error is printed here (returning 1) instead of raised.

    Returns
    -------
    int
        0, or 1 when a --report-only run could not write the reports.

    Raises
    ------
    OSError
        When a report cannot be written (not with `report_only`). Either way the report folders
        this call created and left empty are removed.
    """
    reports_dir = Path(args.reports_dir)
    targets = [reports_dir / variant.profile_dir for variant in sweep_variants(args)]
    if args.sweep_spec is not None:
        targets.append(reports_dir / (f"{args.profile}+{args.sweep_tag}" if args.sweep_tag else args.profile))
    created = [folder for target in targets for folder in missing_folders(target)]
    try:
        for variant in sweep_variants(args):
            for _, _, problem in iter_records(Path(args.results_dir) / variant.profile_dir):
                if problem:
                    print(f"warning: {problem}; treated as missing in the tables", file=sys.stderr)
            files = write_reports(Path(args.results_dir), reports_dir, variant.profile_dir, args.protocol)
            print(f"reports written to {reports_dir / variant.profile_dir} ({len(files)} files)")
        if args.sweep_spec is not None:
            files = write_sensitivity(Path(args.results_dir), reports_dir, args.profile, args.sweep_spec,
                                      args.sweep_tag, args.protocol)
            for path in files:
                print(f"sensitivity: {path}")
            if not files:
                print(f"sensitivity: no records of the sweep {args.sweep_spec.name} yet", file=sys.stderr)
    except OSError as exc:
        remove_empty_folders(created)
        if not report_only:
            raise
        print(f"{prog_name()}: could not write the reports: {exc}; the records are intact, rerun with --report-only",
              file=sys.stderr)
        return 1
    return 0


def _print_estimate(args: argparse.Namespace, pending: list[Job], settings: RunSettings) -> tuple[int, Any]:
    """The expected wall time of the pending jobs (`--estimate`, and before every paper / quick
    run), from finished records in the results folder where there are some, else a calibration.
    On a CPU, past an hour, also the quick profile's. Returns the exit code for --estimate and the
    estimate (None when it failed), whose per-job figures the progress display uses."""
    limit_threads(settings.threads_per_job)  # calibrate at the thread count the jobs will use
    n_parallel = min(args.n_jobs, max(1, len(pending)))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def estimate_of(jobs: list[Job]) -> Any:
        return estimate_jobs(jobs, args.data_root, not args.no_download, n_parallel, args.device, log,
                             results_dir=Path(args.results_dir), precision=args.precision,
                             val_fraction=args.val_fraction)

    try:
        estimate = estimate_of(pending)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
        print(f"no estimate: the calibration failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1, None
    print(describe(estimate), flush=True)
    if resolve_device(args.device).type == "cpu" and estimate.wall_seconds > 3600 and args.profile != "quick":
        quick_args = parse_config([*args.argv_for_estimate, "--profile", "quick"])
        quick_jobs = build_jobs(quick_args)
        try:
            quick = estimate_of(quick_jobs)
            quick_text = f"about {format_seconds(quick.wall_seconds)} for its {len(quick_jobs)} jobs"
        except Exception as exc:  # noqa: BLE001
            quick_text = f"no estimate ({type(exc).__name__}: {exc})"
        print(f"note: on this CPU the {args.profile} profile takes about {format_seconds(estimate.wall_seconds)}; "
              f"`--profile quick` (CPU budgets, the same jobs) takes {quick_text}. "
              f"A GPU (--device cuda) is the way to the paper's budgets.", flush=True)
    return 0, estimate


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: sys.argv[1:]).

    Returns
    -------
    int
        Exit status: 0 ok, 1 failed / diverged / lost jobs or unwritable reports, 2 usage or data error,
        130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parse_config(argv)
            args.argv_for_estimate = [a for a in argv if a != "--estimate"]
        except SystemExit as exit_:  # argparse: --help (0) or a malformed command line (2)
            return int(exit_.code or 0)
        variants = sweep_variants(args)
        if args.report_only and args.sweep_spec is None:
            return _report(args, report_only=True)
        jobs_per_variant = [build_jobs(variant) for variant in variants]
        for jobs in jobs_per_variant:  # every swept value checked before anything is written
            validate_jobs(jobs)
        if args.report_only:
            return _report(args, report_only=True)
        results_dir = Path(args.results_dir)
        for dataset in args.datasets:  # every data file checked before any training starts
            load_dataset(dataset, args.data_root, download=not args.no_download)
        created = check_writable(results_dir)  # last: a usage or data error leaves nothing on disk
    except UsageError as exc:
        print(f"{prog_name()}: error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"{prog_name()}: data error: {exc}", file=sys.stderr)
        return 2

    exit_code = 0
    for variant, jobs in zip(variants, jobs_per_variant):
        code = _run_jobs(variant, jobs, argv)
        if code == 130:
            return 130
        if code == 2:  # refused before training (records of another training set, no backend): no reports
            remove_empty_folders(created)  # and no results folder this run created and left empty
            return 2
        exit_code = max(exit_code, code)
    if args.estimate:  # an estimate trains nothing, so there is nothing new to report
        return exit_code
    try:
        _report(args)
    except OSError as exc:
        print(f"{prog_name()}: could not write the reports: {exc}; the records are intact, rerun with --report-only",
              file=sys.stderr)
        exit_code = 1
    return exit_code


def _held_out_share(record: dict) -> float:
    """The --val-fraction a record was trained with (0 for records made before the option)."""
    return float((record.get("sampling") or {}).get("val_fraction") or 0.0)


def _precision_conflicts(args: argparse.Namespace, jobs: list[Job]) -> list[str]:
    """Records that would put one detector in two training precisions in one results folder.

    For each (dataset, method) of the run, the precision its jobs will train in (--precision, with
    "auto" resolved per detector on this run's device: `benchmark.estimate.job_precision`) against
    ``run_info.precision`` of every record already in that folder (records from before the option:
    fp32), whichever class or seed they are of: a table over the folder would otherwise average
    across precisions.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line (results_dir, profile_dir, protocol, precision).
    jobs : list of Job
        The run's jobs.

    Returns
    -------
    list of str
        One line per (folder, recorded precision): how many records, and the precision this run would use.
    """
    conflicts = []
    planned: dict[tuple[str, str], Job] = {}
    for job in jobs:
        planned.setdefault((job.key.dataset, job.key.method), job)
    for (dataset, method), job in planned.items():
        folder = Path(args.results_dir) / args.profile_dir / args.protocol / dataset / method
        if not folder.is_dir():
            continue
        trains_in = job_precision(get_method(method).load()(**job.params), args.precision)
        found: dict[str, int] = {}
        for _, record, _ in iter_records(folder):
            recorded = ((record or {}).get("run_info") or {}).get("precision", "fp32")
            if record is not None and recorded != trains_in:
                found[recorded] = found.get(recorded, 0) + 1
        conflicts += [f"{folder}: {count} record(s) trained in {recorded}; this run trains {method} in {trains_in}"
                      for recorded, count in sorted(found.items())]
    return conflicts


def _run_jobs(args: argparse.Namespace, jobs: list[Job], argv: list[str]) -> int:
    """Run the jobs of one configuration that have no ok / diverged record yet. Returns 0, 1 (a
    job failed, diverged or was lost, or the results folder became unwritable), 2 (the backend could not
    start) or 130 (interrupted)."""
    results_dir = Path(args.results_dir)
    pending, already, unreadable, mixed, already_records = [], [], [], [], []
    for job in jobs:
        record, problem = existing_record(results_dir, job.key)  # read once: the skip and the check below
        if record is not None and _held_out_share(record) != args.val_fraction:
            mixed.append((job.key.label(), _held_out_share(record)))  # --force included: never mixed either
        if args.force:
            record, problem = None, None
        if problem:
            unreadable.append(problem)
        if record is not None and record["status"] in ("ok", "diverged"):
            already.append(record["status"])
            already_records.append(record)
            remove_idle_stray_temp_files(job.key, results_dir)
        else:
            pending.append(job)
    for problem in unreadable:
        print(f"warning: {problem}; the job will be rerun", file=sys.stderr)
    conflicts = _precision_conflicts(args, jobs)
    if conflicts:
        print(f"{prog_name()}: error: this run (--precision {args.precision}) would put a detector in two training "
              "precisions in one results folder, and so in one table:\n  " + "\n  ".join(conflicts) +
              "\nNothing was trained and no record was touched. Give the precision those records have "
              "(e.g. --precision fp32 for records made before bf16 became some detectors' default), or another "
              "--results-dir / --tag", file=sys.stderr)
        return 2
    if mixed:
        folder = results_dir / args.profile_dir
        held = sorted({fraction for _, fraction in mixed})
        target = f"{folder}+val{held[0]:g}" if len(held) == 1 else f"{folder}-old"
        print(f"{prog_name()}: error: {folder} holds {len(mixed)} records of these jobs trained with --val-fraction "
              f"{', '.join(f'{f:g}' for f in held)} (the default before the paper's whole training set became the "
              f"default), e.g. {mixed[0][0]}; this run (--val-fraction {args.val_fraction:g}) would mix two training "
              f"sets in one table. Nothing was trained. Move them out of the way (mv {folder} {target}) or choose "
              "another --results-dir", file=sys.stderr)
        return 2
    print(f"{len(jobs)} jobs: {len(already)} already recorded, {len(pending)} to run "
          f"(profile {args.profile_dir}, protocol {args.protocol}, data {resolve_data_root(args.data_root)})")
    # The thread count depends on --jobs / --threads only, never on how many jobs are pending, so a
    # rerun of a few jobs trains them as the first run did (bit-identical results need one count).
    threads = args.n_threads or max(1, (os.cpu_count() or 1) // args.n_jobs)
    _warn_other_thread_counts(already_records, threads, args)
    # Workers never download: main() checked (or fetched) every data file before this point.
    settings = RunSettings(results_dir=results_dir, data_root=args.data_root, download=False,
                           threads_per_job=threads, threads_fixed=args.n_threads is not None,
                           track_auroc=args.track_auroc, overrides=args.override_map,
                           provenance=provenance([prog_name(), *argv]),
                           force=args.force, started_at=time.time(), val_fraction=args.val_fraction,
                           train_options=TrainOptions(precision=args.precision, cuda_graphs=args.cuda_graphs))
    expected: dict = {}
    if args.estimate or (args.profile != "smoke" and pending):
        code, estimate = _print_estimate(args, pending, settings)
        if args.estimate:
            return code
        if estimate is not None:  # the progress display's remaining time comes from the same figures
            expected = {job.key: job_estimate.seconds for job, job_estimate in zip(pending, estimate.jobs)}
    started = time.perf_counter()
    try:
        stack, why_alone = stack_size(args.stack_size, args.device, settings.train_options)
        if why_alone:
            print(f"note: {why_alone}")
        outcomes = execute(pending, replace(settings, stack=stack), args.n_jobs, progress=not args.no_progress,
                           backend=args.backend, scheduler=args.scheduler, expected_seconds=expected)
    except BackendUnavailable as exc:
        print(f"{prog_name()}: error: {exc}; nothing was trained", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished jobs are recorded; run the same command again to do the rest", file=sys.stderr)
        return 130
    except ResultsWriteError as exc:
        print(f"{prog_name()}: cannot write results: {exc}; records already written are intact", file=sys.stderr)
        return 1
    print(summary(outcomes, time.perf_counter() - started))
    bad = [o for o in outcomes if o.status in ("failed", "diverged", "lost", NOT_STARTED)
           and not o.by_another_runner] + [s for s in already if s == "diverged"]
    return 1 if bad else 0


def summary(outcomes: list[JobOutcome], seconds: float) -> str:
    """The run's last line: what this runner trained, and what another runner finished meanwhile.

    Parameters
    ----------
    outcomes : list of JobOutcome
        The run's outcomes.
    seconds : float
        Its wall time.

    Returns
    -------
    str
        E.g. "ran 5 jobs in 12.0 s: 4 ok, 0 failed, 0 diverged, 1 lost (...); 4 finished by another runner ...".
    """
    here = [o for o in outcomes if not o.by_another_runner]
    other = [o.key.label() for o in outcomes if o.by_another_runner]
    lost = [o.key.label() for o in here if o.status == "lost"]
    not_started = [o.key.label() for o in here if o.status == NOT_STARTED]
    trained = [o for o in here if o.status not in ("lost", NOT_STARTED)]
    return (f"ran {len(trained)} jobs in {seconds:.1f} s: "
            f"{sum(o.status == 'ok' for o in here)} ok, {sum(o.status == 'failed' for o in here)} failed, "
            f"{sum(o.status == 'diverged' for o in here)} diverged"
            + (f", {len(lost)} lost (worker died; rerun to do them: {', '.join(lost)})" if lost else "")
            + (f", {len(not_started)} not started (rerun to do them: {', '.join(not_started)})" if not_started else "")
            + (f"; {len(other)} finished by another runner meanwhile (not counted above): {', '.join(other)}"
               if other else ""))


def _warn_other_thread_counts(records: list[dict], threads: int, args: argparse.Namespace) -> None:
    """Say so when this folder holds records of these jobs made at another thread count (the reports name them)."""
    if args.scheduler and args.n_threads is None:  # a cluster started elsewhere (--scheduler needs one)
        return  # each worker decides; the reports say if the counts differ
    others = sorted({int(r["threads"]) for r in records if r.get("threads") is not None} - {threads})
    if others:
        print(f"note: {sum(r.get('threads') in others for r in records)} records of these jobs were trained with "
              f"{', '.join(map(str, others))} threads per job and this run uses {threads}; results are bit-identical "
              f"only at one thread count, so the reports name the records of the other count. To match them, rerun "
              f"with --threads {others[0]}", file=sys.stderr)
