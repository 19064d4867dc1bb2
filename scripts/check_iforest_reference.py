"""An independent check of the default training set: iForest's AUROCs in a results folder against
pyod's IsolationForest fitted, outside this package, on every normal training image of the paper's
split (section 4.1: train = the normal class of the training split; test = the other classes of the
training split + the whole test split).

The data are read by torchvision (not by benchmark.data), the split is built here by hand, the
model is pyod's IForest built with each record's hyperparameters and seed, and the AUROC is
scikit-learn's. Usage (after `python run_all.py --dataset mnist --methods iforest`):

    python scripts/check_iforest_reference.py --results-dir results --data-root ../shared/data

Exit status 0 when every class matches (|difference| <= 1e-12), 1 otherwise, 2 when records are missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torchvision
from pyod.models.iforest import IForest
from sklearn.metrics import roc_auc_score

TOLERANCE = 1e-12
DATASETS = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}


def paper_split(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                normal: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, test, labels) of the paper's protocol, images flattened and scaled to [0, 1]."""
    def flat(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / np.float32(255.0)).reshape(len(x), -1)

    x_train = flat(train_x[train_y == normal])
    x_test = np.concatenate([flat(test_x), flat(train_x[train_y != normal])])
    y_test = np.concatenate([(test_y != normal).astype(int), np.ones(int((train_y != normal).sum()), int)])
    return x_train, x_test, y_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    parser.add_argument("--profile", default="paper")
    args = parser.parse_args(argv)
    folder = Path(args.results_dir) / args.profile / "paper" / args.dataset / "iforest"
    records = sorted(folder.glob("class*_seed*.json"))
    if not records:
        print(f"no iForest records in {folder}: run `python run_all.py --dataset {args.dataset} --methods iforest`"
              " first", file=sys.stderr)
        return 2
    train = DATASETS[args.dataset](args.data_root, train=True, download=False)
    test = DATASETS[args.dataset](args.data_root, train=False, download=False)
    arrays = (train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy())
    worst = 0.0
    print(f"{'class':>5} {'n_train':>7} {'record':>10} {'reference':>10} {'difference':>11}  val_fraction")
    for path in records:
        record = json.loads(path.read_text())
        normal = int(record["normal_class"])
        params = {k: v for k, v in record["hyperparameters"].items() if k != "random_state"}
        x_train, x_test, y_test = paper_split(*arrays, normal)
        model = IForest(random_state=int(record["hyperparameters"]["random_state"]), **params).fit(x_train)
        reference = float(roc_auc_score(y_test, model.decision_function(x_test)))
        ours = float(record["metrics"]["auroc"])
        worst = max(worst, abs(ours - reference))
        print(f"{normal:>5} {len(x_train):>7} {ours:>10.6f} {reference:>10.6f} {ours - reference:>11.2e}  "
              f"{(record.get('sampling') or {}).get('val_fraction')}")
    verdict = "equal" if worst <= TOLERANCE else "DIFFERENT"
    print(f"largest |difference| {worst:.2e}: {verdict} on {len(records)} classes")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
