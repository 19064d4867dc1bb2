"""One-class tasks: the exact counts under both protocols on the real MNIST files, and on a synthetic
dataset of distinct images, which image lands in which split, checked by content."""
import numpy as np
import pytest

from benchmark.data import Dataset, load_dataset
from benchmark.splits import Subsample, make_task


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load_dataset("mnist", shared_data, download=False)


def test_mnist_class0_paper_protocol(mnist):
    # train: the 5,923 zeros of the training split; test: the 54,077 non-zeros of the training
    # split + all 10,000 test images (980 zeros).
    task = make_task(mnist, 0, "paper")
    assert task.sizes == {"n_train": 5923, "n_test": 64077, "n_test_normal": 980, "n_test_anomalous": 63097}
    assert task.x_train.shape == (5923, 1, 28, 28) and task.x_train.dtype == np.float32
    assert task.x_test.shape == (64077, 1, 28, 28)
    assert 0.0 <= task.x_train.min() and task.x_train.max() <= 1.0 and task.x_train.max() == 1.0


def test_mnist_class0_standard_protocol(mnist):
    task = make_task(mnist, 0, "standard")
    assert task.sizes == {"n_train": 5923, "n_test": 10000, "n_test_normal": 980, "n_test_anomalous": 9020}


def test_labels_match_the_classes(mnist):
    task = make_task(mnist, 3, "standard")
    expected = (mnist.test_labels != 3).astype(np.int8)
    # normals first, then anomalies, each in file order
    np.testing.assert_array_equal(np.sort(task.y_test), np.sort(expected))
    np.testing.assert_array_equal(task.x_test[: (mnist.test_labels == 3).sum()] * 255,
                                  mnist.test_images[mnist.test_labels == 3].astype(np.float32))


def test_quick_subsample_keeps_every_normal_and_is_the_same_for_every_call(mnist):
    cap = Subsample(max_test_anomalous=5000)
    first, second = make_task(mnist, 8, "paper", cap), make_task(mnist, 8, "paper", cap)
    assert first.sizes["n_test_normal"] == 974 and first.sizes["n_test_anomalous"] == 5000
    np.testing.assert_array_equal(first.x_test, second.x_test)
    assert make_task(mnist, 9, "paper", cap).sample_seed != first.sample_seed


def test_bad_protocol_and_class(mnist):
    with pytest.raises(ValueError, match="valid choices: paper, standard"):
        make_task(mnist, 0, "reverse")
    with pytest.raises(ValueError, match="out of range"):
        make_task(mnist, 10, "paper")


# ---- membership by content, on a synthetic dataset whose images are all distinct ---------------
# Each uint8 image carries its provenance in its first row: split (0 train, 1 test), index in
# that split (two bytes) and class. So every check below reads the images themselves, never the
# counts or the indices make_task used.
SPLIT_TRAIN, SPLIT_TEST = 0, 1
N_CLASSES = 3


def _tagged_images(labels: np.ndarray, split: int) -> np.ndarray:
    """uint8 (N, 1, 4, 4) images whose pixels encode (split, index, class), plus filler.

    Parameters
    ----------
    labels : ndarray
        int64 (N,) class of each image.
    split : int
        SPLIT_TRAIN or SPLIT_TEST.

    Returns
    -------
    ndarray
        Pairwise distinct images (the (split, index) tag is unique).
    """
    images = np.full((len(labels), 1, 4, 4), 7, dtype=np.uint8)
    index = np.arange(len(labels))
    images[:, 0, 0, :] = np.stack([np.full_like(index, split), index // 256, index % 256, labels], axis=1)
    return images


def _decode(x: np.ndarray) -> np.ndarray:
    """(split, index, class) of each float32 image of a task, shape (N, 3)."""
    tag = np.rint(x[:, 0, 0, :] * 255).astype(np.int64)
    return np.stack([tag[:, 0], tag[:, 1] * 256 + tag[:, 2], tag[:, 3]], axis=1)


def _keys(x: np.ndarray) -> list[bytes]:
    return [image.tobytes() for image in x]


@pytest.fixture(scope="module")
def tagged():
    # Classes interleaved (not sorted), so an image's index says nothing about its class.
    train_labels = np.arange(90, dtype=np.int64) % N_CLASSES
    test_labels = (np.arange(45, dtype=np.int64) * 2) % N_CLASSES
    return Dataset("tagged", _tagged_images(train_labels, SPLIT_TRAIN), train_labels,
                   _tagged_images(test_labels, SPLIT_TEST), test_labels, ("a", "b", "c"), "synthetic")


@pytest.mark.parametrize("protocol", ["paper", "standard"])
@pytest.mark.parametrize("subsample", [Subsample(), Subsample(max_train=20, max_test_normal=6, max_test_anomalous=25)],
                         ids=["all", "capped"])
@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
@pytest.mark.parametrize("normal_class", [0, 2])
def test_splits_by_content(tagged, protocol, subsample, val_fraction, normal_class):
    """No training or validation image in the test set, each test image labelled by its class,
    training and validation images all normal: checked on the images' bytes."""
    task = make_task(tagged, normal_class, protocol, subsample, val_fraction)
    x_val = task.x_val if task.x_val is not None else task.x_train[:0]
    train, val, test = _decode(task.x_train), _decode(x_val), _decode(task.x_test)
    assert (val_fraction > 0) == (len(val) > 0)
    # Every image is, byte for byte, the dataset image its tag names.
    for x, tags in ((task.x_train, train), (x_val, val), (task.x_test, test)):
        for image, (split, index, _) in zip(x, tags):
            source = tagged.train_images if split == SPLIT_TRAIN else tagged.test_images
            np.testing.assert_array_equal(np.rint(image * 255).astype(np.uint8), source[index])

    train_keys, val_keys, test_keys = set(_keys(task.x_train)), set(_keys(x_val)), _keys(task.x_test)
    assert len(train_keys & set(test_keys)) == 0, "training images in the test set"
    assert len(val_keys & set(test_keys)) == 0, "validation images in the test set"
    assert len(train_keys & val_keys) == 0, "validation images also in the training set"
    assert len(set(test_keys)) == len(test_keys) and len(train_keys) == len(train) and len(val_keys) == len(val)

    # Training and validation: normal images of the training split only.
    assert (train[:, 0] == SPLIT_TRAIN).all() and (train[:, 2] == normal_class).all()
    assert (val[:, 0] == SPLIT_TRAIN).all() and (val[:, 2] == normal_class).all()
    # Test labels from the images' own classes; normal test images only ever come from the test split.
    np.testing.assert_array_equal(task.y_test, (test[:, 2] != normal_class).astype(np.int8))
    assert (test[task.y_test == 0, 0] == SPLIT_TEST).all()
    if protocol == "standard":
        assert (test[:, 0] == SPLIT_TEST).all()

    if subsample == Subsample():
        # Uncapped: exactly the protocol's images, each once.
        expected_test = {(SPLIT_TEST, i) for i in range(len(tagged.test_labels))}
        if protocol == "paper":
            expected_test |= {(SPLIT_TRAIN, i) for i in np.flatnonzero(tagged.train_labels != normal_class)}
        assert {(s, i) for s, i, _ in test} == expected_test
        normal_train = {(SPLIT_TRAIN, i) for i in np.flatnonzero(tagged.train_labels == normal_class)}
        assert {(s, i) for s, i, _ in np.concatenate([train, val])} == normal_train
    else:
        assert len(train) + len(val) == 20
        assert task.sizes["n_test_normal"] == 6 and task.sizes["n_test_anomalous"] == 25
