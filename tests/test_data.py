"""Loaders and task-stream builders on tiny synthetic data written in the real file format (IDX)."""
import gzip
import json
import struct
from pathlib import Path

import pytest
import torch

from halrp_fast.data import class_split_stream, load_mnist_like, permuted_stream, read_idx
from halrp_fast.data.benchmarks import FASHION_MNIST_DIR


def write_idx(path: Path, array: torch.Tensor, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.fixture
def mnist_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 60), ("t10k", 20)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g)
        labels = torch.arange(n) % 10
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", images, compress=split == "train")
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress=False)
    return tmp_path


def test_read_idx_raw_and_gzip(mnist_dir):
    data = load_mnist_like(mnist_dir)
    assert data["train_images"].shape == (60, 28, 28) and data["train_images"].dtype == torch.uint8
    assert data["test_labels"].tolist() == [i % 10 for i in range(20)]
    assert torch.equal(read_idx(mnist_dir / "train-labels-idx1-ubyte"), torch.arange(60) % 10)


def test_missing_and_malformed_files(mnist_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing \['train-images-idx3-ubyte'.*nothing is downloaded"):
        load_mnist_like(tmp_path / "empty")
    bad = mnist_dir / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    bad.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="holds 2 bytes of data"):
        read_idx(bad)


def test_permuted_stream(mnist_dir):
    tasks = permuted_stream(load_mnist_like(mnist_dir), 3, batch_size=8, seed=0, valid_frac=0.25)
    assert [t.num_classes for t in tasks] == [10, 10, 10]
    x0, y0 = next(iter(tasks[0].test))
    x1, y1 = next(iter(tasks[1].test))
    assert x0.shape == (20, 3, 32, 32) and torch.equal(y0, y1)
    # same images, different pixel permutations (task 0 permuted too): same multiset of values per image
    assert not torch.equal(x0, x1)
    torch.testing.assert_close(x0[0].flatten().sort().values, x1[0].flatten().sort().values)
    from halrp_fast.data import image_transform

    data = load_mnist_like(mnist_dir)
    unpermuted = image_transform(32, 3, 0.0, 1.0)(data["test_images"][:1])
    assert unpermuted.shape == x0[:1].shape
    assert not torch.equal((x0[0, 0] == x0[0, 0].min()), (unpermuted[0, 0] == unpermuted[0, 0].min()))
    assert tasks[0].train.dataset_size == 45 and tasks[0].val.dataset_size == 15
    again = permuted_stream(load_mnist_like(mnist_dir), 3, batch_size=8, seed=0, valid_frac=0.25)
    assert torch.equal(next(iter(again[2].test))[0], next(iter(tasks[2].test))[0])  # deterministic from the seed


def test_class_split_stream_remaps_labels(mnist_dir):
    tasks = class_split_stream(load_mnist_like(mnist_dir), [[3, 7], [0, 1, 2]], batch_size=4, seed=0, valid_frac=0.0)
    assert [t.num_classes for t in tasks] == [2, 3]
    labels = torch.cat([y for _, y in tasks[0].test])
    assert set(labels.tolist()) == {0, 1} and len(labels) == 4  # classes 3 and 7 of the 20 test images
    assert set(torch.cat([y for _, y in tasks[1].train]).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="distinct classes"):
        class_split_stream(load_mnist_like(mnist_dir), [[1, 1]], batch_size=4)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Debian package dataset-fashion-mnist not installed")
@pytest.mark.parametrize("benchmark", ["split-fmnist", "pfmnist"])
def test_fashion_mnist_benchmarks_end_to_end(benchmark, tmp_path):
    from halrp_fast.cli import main

    rc = main(["run", "--benchmark", benchmark, "--out", str(tmp_path), "--tasks", "2", "--max-per-task", "300",
               "--epochs", "3", "--batch-size", "32", "--no-progress", "--quiet"])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["acc_matrix"]) == 2 and results["acc_matrix"][1][1] > 15  # above chance (≤ 10 %)


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    from halrp_fast.cli import main

    rc = main(["run", "--benchmark", "pfmnist", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST files not found" in err and "dataset-fashion-mnist" in err
