"""One-class tasks on the real MNIST files: the exact counts under both protocols."""
import numpy as np
import pytest

from benchmark.data import load_dataset
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
