"""The paper's Figs. 4, 5 and 6, redrawn from this suite's models and records.

    python -m benchmark.paper_figures fig6 --results-dir results \\
        --profile-glob 'quick+sweep-mem_ganomaly.memory_size=*' --out-dir reports/quick
    python -m benchmark.paper_figures fig45 --data-root DIR --out-dir reports/figures [--profile quick]
        [--epochs E] [--lr LR] [--seed S] [--device auto] [--tsne-samples 2000]

Fig. 6: CIFAR-10, normal class plane: the test AUROC after every epoch (records made with
--track-auroc, a diagnostic that never picks a model), one curve per memory size N, from the
memory-size sweep's records (`run_all.py --sweep mem_ganomaly.memory_size=50,100,... --track-auroc`).

Figs. 4 and 5: a Mem_GANomaly trained on MNIST's normal class 1 (Fig. 4) and 0 (Fig. 5), with
the profile's settings (default: quick) and the paper's lr unless --epochs / --lr say otherwise.
Fig. 4: t-SNE (scikit-learn, fixed random_state) of z - z_hat on a fixed random subsample of the
MNIST test split, (a) normal vs anomalous, (b) digits 1 and 7 only. Fig. 5: test images of every
digit above their reconstructions x_hat, the normal ones (digit 0) framed in red.
Each PNG gets a .md caption beside it saying what was trained and sampled.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.manifold import TSNE

from benchmark.data import CLASS_NAMES, DataError, load_dataset
from benchmark.datasets import TITLES
from benchmark.labels import memory_size_param
from benchmark.records import _atomic_write, iter_records
from benchmark.splits import to_float
from methods import get_method

FIG4_SEED_OFFSET = 4  # the subsample draws of Figs. 4 / 5 use np.random.default_rng(seed + offset)
FIG5_SEED_OFFSET = 5


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, caption: str) -> list[Path]:
    """The figure as PNG (atomically) and its caption as Markdown beside it."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    md = path.with_suffix(".md")
    _atomic_write(md, lambda handle: handle.write(f"![{path.stem}]({path.name})\n\n{caption}\n".encode()))
    return [path, md]


# ---- Fig. 6 -------------------------------------------------------------------------------------
def fig6_curves(results_dir: Path, profile_glob: str, dataset: str = "cifar10", normal_class: int = 0,
                protocol: str = "paper", method: str = "mem_ganomaly") -> list[dict]:
    """The per-epoch test AUROC curves of the records matching the glob, one per record.

    Parameters
    ----------
    results_dir : Path
    profile_glob : str
        A glob over the profile directory names, e.g. 'quick+sweep-mem_ganomaly.memory_size=*'.
    dataset, normal_class, protocol, method : the records to read.

    Returns
    -------
    list of dict
        memory_size (the method's memory size N, None without a memory), epochs, lr, seed, profile,
        base_profile, aurocs (per epoch; None where scores were not finite), final (the final model's
        AUROC); only ok records with a per-epoch diagnostic.
    """
    curves = []
    size_param = memory_size_param(method)  # the constructor argument that is N (Detector.memory_size_param)
    for directory in sorted(Path(results_dir).iterdir()) if Path(results_dir).is_dir() else []:
        if not directory.is_dir() or not fnmatch.fnmatchcase(directory.name, profile_glob):
            continue
        base = directory / protocol / dataset / method.replace(":", "-")
        for path, record, _ in iter_records(base) if base.is_dir() else []:
            if record is None or record["status"] != "ok" or record["normal_class"] != normal_class:
                continue
            per_epoch = (record.get("diagnostics") or {}).get("auroc_per_epoch")
            if not per_epoch:
                continue
            hyper = record.get("hyperparameters") or {}
            curves.append({"memory_size": hyper.get(size_param) if size_param else None, "epochs": hyper.get("epochs"),
                           "lr": hyper.get("lr"),
                           "seed": record["seed"], "profile": record["profile"],
                           "base_profile": record.get("base_profile", record["profile"].split("+")[0]),
                           "aurocs": [e.get("auroc") for e in per_epoch], "final": record["metrics"]["auroc"],
                           "record": str(path)})
    return curves


def fig6(results_dir: Path, profile_glob: str, out: Path, dataset: str = "cifar10", normal_class: int = 0,
         protocol: str = "paper") -> list[Path]:
    """Draw Fig. 6 (AUROC over epochs, one curve per memory size N, seeds averaged) and its caption.

    Parameters
    ----------
    results_dir : Path
        The results root.
    profile_glob : str
        Glob of the profile directories (one per memory size).
    out : Path
        The image file to write.
    dataset : str, default="cifar10"
        Dataset name.
    normal_class : int, default=0
        The normal class.
    protocol : str, default="paper"
        The protocol.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    ValueError
        When no record matches.
    """
    curves = fig6_curves(results_dir, profile_glob, dataset, normal_class, protocol)
    if not curves:
        raise ValueError(f"no ok record with a per-epoch AUROC (--track-auroc) under {results_dir}/{profile_glob}/"
                         f"{protocol}/{dataset}/mem_ganomaly/class{normal_class}_seed*.json")
    groups: dict[tuple, list[dict]] = {}
    for curve in curves:
        groups.setdefault((curve["memory_size"], curve["epochs"], curve["lr"], curve["base_profile"]), []).append(curve)
    budgets = sorted({key[1:] for key in groups}, key=str)
    one_memory_size = len({key[0] for key in groups}) == 1 and len(budgets) > 1
    varies = "learning rate and budget" if one_memory_size else "memory size N"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = []
    for i, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, str(kv[0][1:])))):
        n, epochs, lr, base = key
        length = min(len(m["aurocs"]) for m in members)
        values = np.array([[np.nan if a is None else a for a in m["aurocs"][:length]] for m in members], dtype=float)
        mean = np.nanmean(values, axis=0) if len(members) > 1 else values[0]
        if one_memory_size:  # e.g. an lr sweep: the curves differ in their budget, not in N
            label = f"lr {lr:g}, {epochs} ep" + (f", {base}" if len({b[2] for b in budgets}) > 1 else "")
        else:
            label = f"N = {n}" + (f" ({epochs} ep, lr {lr:g})" if len(budgets) > 1 else "")
        label += f", {len(members)} seeds" if len(members) > 1 else ""
        ax.plot(np.arange(1, length + 1), mean, marker="o" if length <= 30 else None, ms=3, color=f"C{i % 10}",
                label=label)
        finals = [m["final"] for m in members]
        rows.append(f"| {n} | {epochs} | {lr:g} | {base} | {len(members)} | {np.mean(finals):.4f} | "
                    f"{np.nanmax(mean):.4f} (epoch {int(np.nanargmax(mean)) + 1}) |")
    budget = "; ".join(f"{e} epoch{'s' if e != 1 else ''}, lr {lr:g}, {base} profile" for e, lr, base in budgets)
    class_name = CLASS_NAMES[dataset][normal_class]
    ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("test AUROC after the epoch (diagnostic)")
    ax.set_title(f"{TITLES.get(dataset, dataset)}, normal class {class_name}: Mem_GANomaly AUROC over training by "
                 f"{varies}\nbudget: {budget}", fontsize=9)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    what = "AUROC over training" if one_memory_size else "Fig. 6 redrawn"
    caption = (f"{what}: {TITLES.get(dataset, dataset)}, normal class {class_name} ({protocol} protocol), test "
               f"AUROC after every epoch (--track-auroc: a diagnostic of training dynamics, "
               f"never used to pick a model), "
               f"one curve per {'setting' if one_memory_size else 'memory size N'} (mean over seeds where several). "
               f"Budget: {budget}. Records: "
               f"`{results_dir}/{profile_glob}`.\n\n| N | epochs | lr | profile | seeds | final AUROC | "
               f"best epoch on the test set (optimistic) |\n| --- | --- | --- | --- | --- | --- | --- |\n"
               + "\n".join(rows))
    return _save(fig, Path(out), caption)


# ---- Figs. 4 and 5 ------------------------------------------------------------------------------
def train_mem_ganomaly(x_train: np.ndarray, profile: str = "quick", dataset: str = "mnist",
                       epochs: Optional[int] = None, lr: Optional[float] = None, seed: int = 0, device: str = "auto",
                       max_steps: Optional[int] = None) -> Any:
    """A Mem_GANomaly with the profile's settings for the dataset (and the given overrides), fitted on x_train.

    Parameters
    ----------
    x_train : numpy.ndarray
        Training images.
    profile : str, default="quick"
        The profile.
    dataset : str, default="mnist"
        Dataset name.
    epochs : int, optional
        Override of the number of epochs.
    lr : float, optional
        Override of the learning rate.
    seed : int, default=0
        Random state.
    device : str, default="auto"
        Torch device.
    max_steps : int, optional
        Cap on the optimiser steps.

    Returns
    -------
    Any
        The fitted detector.
    """
    spec = get_method("mem_ganomaly")
    params = {**spec.settings(profile, dataset), "random_state": seed, "device": device}
    for name, value in (("epochs", epochs), ("lr", lr), ("max_steps", max_steps)):
        if value is not None:
            params[name] = value
    return spec.load()(**params).fit(x_train)


def _tsne(features: np.ndarray, seed: int) -> np.ndarray:
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    return TSNE(n_components=2, random_state=seed, init="pca", perplexity=perplexity).fit_transform(features)


def figure4(detector: Any, x_test: np.ndarray, digits: np.ndarray, normal_digit: int, path: Path, n_samples: int = 2000,
            pair: tuple[int, int] = (1, 7), seed: int = 0, budget: str = "") -> list[Path]:
    """Fig. 4: t-SNE of z - z_hat. (a) a fixed random subsample of the test images, normal vs
    anomalous; (b) the test images of the two digits of `pair` only (the same size of subsample).

    Parameters
    ----------
    detector : GANomaly or MemGANomaly
        A fitted model (its `latents`).
    x_test : np.ndarray
        [0, 1] images (N, C, H, W).
    digits : np.ndarray
        The digit (class) of each test image.
    normal_digit : int
    path : Path
        The PNG to write (a .md caption goes beside it).
    n_samples : int
        Images per panel (all when fewer).
    pair : tuple of int
    seed : int
        Seeds the subsample (np.random.default_rng(seed + 4)) and t-SNE's random_state.
    budget : str
        The training budget, for the caption.
    """
    rng = np.random.default_rng(seed + FIG4_SEED_OFFSET)
    digits = np.asarray(digits)
    panels = []
    for subset in (np.arange(len(digits)), np.flatnonzero(np.isin(digits, pair))):
        chosen = np.sort(rng.choice(subset, size=min(n_samples, len(subset)), replace=False))
        z, z_hat = detector.latents(x_test[chosen])
        panels.append((chosen, _tsne(z - z_hat, seed)))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    (idx_a, emb_a), (idx_b, emb_b) = panels
    normal = digits[idx_a] == normal_digit
    axes[0].scatter(*emb_a[~normal].T, s=4, c="tab:blue", alpha=0.5, label=f"anomalous (digits != {normal_digit})")
    axes[0].scatter(*emb_a[normal].T, s=4, c="tab:red", alpha=0.7, label=f"normal (digit {normal_digit})")
    axes[0].set_title(f"(a) {len(idx_a)} test images: normal vs anomalous", fontsize=10)
    for digit, colour in zip(pair, ("tab:red", "tab:green")):
        mask = digits[idx_b] == digit
        axes[1].scatter(*emb_b[mask].T, s=4, c=colour, alpha=0.6,
                        label=f"digit {digit}" + (" (normal)" if digit == normal_digit else ""))
    axes[1].set_title(f"(b) {len(idx_b)} test images of digits {pair[0]} and {pair[1]} only", fontsize=10)
    for ax in axes:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.legend(fontsize=8, markerscale=3)
    fig.suptitle(f"t-SNE of z - z_hat, Mem_GANomaly trained on MNIST digit {normal_digit}" +
                 (f" ({budget})" if budget else ""), fontsize=10)
    fig.tight_layout()
    caption = (f"Fig. 4 redrawn: t-SNE (scikit-learn, 2 components, PCA init, random_state {seed}) of z - z_hat "
               f"({z.shape[1]} dimensions) from a Mem_GANomaly trained on the normal digit {normal_digit}"
               + (f" ({budget})" if budget else "")
               + f". (a) a fixed random subsample of {len(idx_a)} MNIST test images "
               f"(numpy default_rng({seed + FIG4_SEED_OFFSET})), normal vs anomalous; (b) {len(idx_b)} test images of "
               f"digits {pair[0]} and {pair[1]} only. t-SNE distances between clusters are not meaningful; the "
               "question is only whether the classes separate.")
    return _save(fig, Path(path), caption)


def figure5(detector: Any, x_test: np.ndarray, digits: np.ndarray, normal_digit: int, path: Path, per_digit: int = 2,
            seed: int = 0, budget: str = "") -> list[Path]:
    """Fig. 5: test images above their reconstructions x_hat; the normal ones framed in red.

    Parameters
    ----------
    detector : Any
        A fitted Mem_GANomaly.
    x_test : numpy.ndarray
        Test images.
    digits : numpy.ndarray
        Their digits.
    normal_digit : int
        The normal digit.
    path : Path
        The image file to write.
    per_digit : int, default=2
        Images of every digit (a fixed random draw).
    seed : int, default=0
        Seed of the draw.
    budget : str, default=""
        Training budget, for the caption.

    Returns
    -------
    list of Path
        The files written.
    """
    rng = np.random.default_rng(seed + FIG5_SEED_OFFSET)
    digits = np.asarray(digits)
    chosen = []
    for rank in range(per_digit):
        for digit in np.unique(digits):
            pool = np.flatnonzero(digits == digit)
            if rank < len(pool):
                chosen.append(rng.permutation(pool)[rank])
    chosen = np.array(chosen)
    x_hat = detector.reconstruct(x_test[chosen])
    columns = len(np.unique(digits))
    blocks = int(np.ceil(len(chosen) / columns))
    plt = _plt()
    fig, axes = plt.subplots(2 * blocks, columns, figsize=(1.1 * columns, 2.3 * blocks), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for k, index in enumerate(chosen):
        block, col = divmod(k, columns)
        for row, image in ((2 * block, x_test[index]), (2 * block + 1, x_hat[k])):
            ax = axes[row, col]
            ax.imshow(np.transpose(image, (1, 2, 0)).squeeze(), cmap="gray", vmin=0, vmax=1)
            if digits[index] == normal_digit:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_edgecolor("red")
                    spine.set_linewidth(3)
        axes[2 * block, 0].set_ylabel("input", fontsize=8)
        axes[2 * block + 1, 0].set_ylabel("x_hat", fontsize=8)
    fig.suptitle(f"MNIST test images (odd rows) and Mem_GANomaly reconstructions (even rows); trained on digit "
                 f"{normal_digit}, normal images framed in red" + (f"\n{budget}" if budget else ""), fontsize=9)
    fig.tight_layout()
    caption = (f"Fig. 5 redrawn: {len(chosen)} MNIST test images ({per_digit} of every digit, a fixed random draw, "
               f"numpy default_rng({seed + FIG5_SEED_OFFSET})) above their reconstructions x_hat "
               f"(32 x 32, mapped back to [0, 1]) by "
               f"a Mem_GANomaly trained on digit {normal_digit}" + (f" ({budget})" if budget else "") +
               "; the normal images are framed in red.")
    return _save(fig, Path(path), caption)


def run_fig45(data_root: Optional[str], out_dir: Path, profile: str = "quick", epochs: Optional[int] = None,
              lr: Optional[float] = None, seed: int = 0, device: str = "auto", tsne_samples: int = 2000,
              max_steps: Optional[int] = None, download: bool = True) -> list[Path]:
    """Train the two models (normal digit 1 for Fig. 4, 0 for Fig. 5) on MNIST and draw both figures.

    The files go into out_dir: fig4_tsne.png, fig5_reconstructions.png and their captions.

    Parameters
    ----------
    data_root : str or None
        Dataset folder.
    out_dir : Path
        Output folder.
    profile : str, default="quick"
        The profile.
    epochs : int, optional
        Override of the number of epochs.
    lr : float, optional
        Override of the learning rate.
    seed : int, default=0
        Random state.
    device : str, default="auto"
        Torch device.
    tsne_samples : int, default=2000
        Test images embedded by t-SNE for Fig. 4.
    max_steps : int, optional
        Cap on the optimiser steps.
    download : bool, default=True
        Download MNIST if missing.

    Returns
    -------
    list of Path
        The files written.
    """
    data = load_dataset("mnist", data_root, download=download)
    x_test, digits = to_float(data.test_images), np.asarray(data.test_labels)
    written = []
    for normal_digit, draw in ((1, "fig4"), (0, "fig5")):
        detector = train_mem_ganomaly(to_float(data.train_images[data.train_labels == normal_digit]), profile, "mnist",
                                      epochs, lr, seed, device, max_steps)
        budget = (f"{profile} profile: {detector.epochs} epoch{'s' if detector.epochs != 1 else ''}, "
                  f"lr {detector.lr:g}, "
                  f"N = {detector.memory_size}, seed {seed}" + (f", at most {max_steps} steps" if max_steps else ""))
        if draw == "fig4":
            written += figure4(detector, x_test, digits, normal_digit, Path(out_dir) / "fig4_tsne.png", tsne_samples,
                               seed=seed, budget=budget)
        else:
            written += figure5(detector, x_test, digits, normal_digit, Path(out_dir) / "fig5_reconstructions.png",
                               seed=seed, budget=budget)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Draw a paper figure from the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: sys.argv[1:]).

    Returns
    -------
    int
        Exit status: 0 ok, 2 on a bad argument.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmark.paper_figures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    p6 = sub.add_parser("fig6", help="AUROC over epochs per memory size N (CIFAR-10, plane)")
    p6.add_argument("--results-dir", default="results")
    p6.add_argument("--profile-glob", default="quick+sweep-mem_ganomaly.memory_size=*",
                    help="glob over profile directory names (default: %(default)s)")
    p6.add_argument("--dataset", default="cifar10")
    p6.add_argument("--normal-class", type=int, default=0)
    p6.add_argument("--protocol", default="paper")
    p6.add_argument("--out-dir", default="reports/figures")
    p45 = sub.add_parser("fig45", help="t-SNE of z - z_hat (Fig. 4) and reconstructions (Fig. 5) on MNIST")
    p45.add_argument("--data-root", help="dataset folder (default: $MEMGAN_DATA, else ./data)")
    p45.add_argument("--out-dir", default="reports/figures")
    p45.add_argument("--profile", default="quick", choices=("paper", "quick", "smoke"))
    p45.add_argument("--epochs", type=int, help="override the profile's epochs")
    p45.add_argument("--lr", type=float, help="override the learning rate (default: the paper's 2e-3)")
    p45.add_argument("--seed", type=int, default=0)
    p45.add_argument("--device", default="auto")
    p45.add_argument("--tsne-samples", type=int, default=2000)
    p45.add_argument("--max-steps", type=int, help="cap on training steps (smoke runs)")
    p45.add_argument("--no-download", action="store_true")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.figure == "fig6":
            name = (f"fig6_{args.dataset}_class{args.normal_class}_auroc_per_epoch"
                    f"{'' if args.protocol == 'paper' else '_' + args.protocol}.png")
            files = fig6(Path(args.results_dir), args.profile_glob, Path(args.out_dir) / name, args.dataset,
                         args.normal_class, args.protocol)
        else:
            for name in ("epochs", "tsne_samples", "max_steps"):
                if getattr(args, name) is not None and getattr(args, name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
            if args.lr is not None and not args.lr > 0:
                raise ValueError(f"--lr must be > 0, got {args.lr}")
            files = run_fig45(args.data_root, Path(args.out_dir), args.profile, args.epochs, args.lr, args.seed,
                              args.device, args.tsne_samples, args.max_steps, download=not args.no_download)
    except (ValueError, DataError) as exc:
        print(f"paper_figures: error: {exc}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
