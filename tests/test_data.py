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


def test_permuted_stream_is_the_authors_pmnist(mnist_dir):
    """Resize 28 → 32 by PIL's bilinear filter, standardise, three channels, then one permutation of all 3·32·32
    values per task drawn as the authors' loader draws it (scikit-learn's shuffle); the first 20 % of the training
    file is the validation part; training batches drop the last partial batch."""
    import numpy as np
    from PIL import Image
    from sklearn.utils import shuffle

    data = load_mnist_like(mnist_dir)
    tasks = permuted_stream(data, 3, batch_size=8, seed=4, valid_frac=0.25)
    assert [t.num_classes for t in tasks] == [10, 10, 10]
    assert torch.equal(tasks[0].val.indices, torch.arange(15)) and torch.equal(tasks[0].train.indices,
                                                                               torch.arange(15, 60))
    assert len(tasks[0].train) == 5 and sum(len(y) for _, y in tasks[0].train) == 40  # 45 samples, batches of 8
    pixels = data["train_images"].double() / 255
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std(unbiased=False)), 4)
    seeds = shuffle(np.arange(3), random_state=4)
    for t, task in enumerate(tasks):
        x, y = next(iter(task.test))
        assert x.shape == (8, 3, 32, 32) and torch.equal(y, data["test_labels"][:8])
        for i in (0, 5):
            img = np.asarray(Image.fromarray(data["test_images"][i].numpy()).resize((32, 32), Image.BILINEAR))
            flat = ((torch.from_numpy(img.copy()).double() / 255 - mean) / std).expand(3, 32, 32).reshape(-1).numpy()
            expected = shuffle(flat, random_state=int(seeds[t]) * 100 + t)
            torch.testing.assert_close(x[i].double().reshape(-1), torch.from_numpy(expected), rtol=0, atol=1e-6)
        assert not torch.equal(x[:, 0], x[:, 1])  # the channels are permuted jointly, so they differ
    again = permuted_stream(load_mnist_like(mnist_dir), 3, batch_size=8, seed=4, valid_frac=0.25)
    assert torch.equal(next(iter(again[2].test))[0], next(iter(tasks[2].test))[0])  # deterministic from the seed
    with pytest.raises(ValueError, match="make no full batch of batch_size=64"):
        permuted_stream(data, 1, batch_size=64, valid_frac=0.25)


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


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    import pickle

    import numpy as np

    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        coarse = fine % 20  # a synthetic coarse grouping: fine classes c, c+20, c+40, c+60, c+80
        blob = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                "coarse_labels": coarse.tolist()}
        with open(d / split, "wb") as f:
            pickle.dump(blob, f)
    return root


def test_cifar100_splits_and_orders_map_back_to_task_identity(tmp_path):
    from halrp_fast.data.cifar import SPLIT_ORDERS, cifar100_splits, load_cifar100

    data = load_cifar100(write_cifar100(tmp_path))
    assert data["train_images"].shape == (200, 3, 32, 32)
    for order in "AB":
        tasks = cifar100_splits(data, batch_size=16, order=order, valid_frac=0.0)
        assert len(tasks) == 10 and all(t.num_classes == 10 for t in tasks)
        for pos, t in enumerate(tasks):
            split = SPLIT_ORDERS[order][pos]
            assert t.name == f"cifar100-split{split}"
            # the task's test images are exactly those of classes 10·split … 10·split + 9
            n = sum(len(y) for _, y in t.test)
            assert n == int(((data["test_labels"] // 10) == split).sum())
    x, y = next(iter(tasks[0].train))
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and int(y.max()) < 10


def test_cifar100_split_is_the_authors_and_independent_of_the_order(tmp_path):
    """The authors' loader: one numpy generator seeded once shuffles the classes' indices split after split (in
    split order), keeps ⌈train_size·n⌉, the first ⌊valid·n⌋ of those validate; training batches keep that order
    in every epoch.  A task's split is therefore the same in every task order."""
    import numpy as np

    from halrp_fast.data.cifar import SPLIT_ORDERS, cifar100_splits, load_cifar100

    data = load_cifar100(write_cifar100(tmp_path, n_train=1000))
    labels = data["train_labels"].numpy()
    np.random.seed(31)  # restated from the authors' get_train_valid_loader_cifar100
    expected = {}
    for split in range(10):
        idx = np.hstack([np.where(labels == c)[0] for c in range(10 * split, 10 * split + 10)]).tolist()
        np.random.shuffle(idx)
        idx = idx[: int(np.ceil(0.6 * len(idx)))]
        n_val = int(np.floor(0.2 * len(idx)))
        expected[split] = (idx[n_val:], idx[:n_val])
    for order in "AD":
        tasks = cifar100_splits(data, batch_size=16, seed=31, order=order, subset=0.6)
        for pos, task in enumerate(tasks):
            train, val = expected[SPLIT_ORDERS[order][pos]]
            assert task.train.indices.tolist() == train and task.val.indices.tolist() == val
    first = [y for _, y in tasks[3].train]
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in tasks[3].train]))  # no reshuffling


def test_cifar100_superclass_groups_by_coarse_label(tmp_path):
    from halrp_fast.data.cifar import SUPERCLASS_ORDERS, cifar100_superclass, load_cifar100

    data = load_cifar100(write_cifar100(tmp_path))
    tasks = cifar100_superclass(data, batch_size=8, order="C", valid_frac=0.0)
    assert len(tasks) == 20 and all(t.num_classes == 5 for t in tasks)
    assert tasks[0].name == f"cifar100-superclass{SUPERCLASS_ORDERS['C'][0]}"


def test_cifar100_missing_and_bad_order(tmp_path):
    from halrp_fast.data.cifar import cifar100_splits, load_cifar100

    with pytest.raises(FileNotFoundError, match="expected the python pickles 'train' and 'test'"):
        load_cifar100(tmp_path)
    data = load_cifar100(write_cifar100(tmp_path / "c"))
    with pytest.raises(ValueError, match="order must be one of"):
        cifar100_splits(data, 8, order="F")


def test_cli_runs_cifar100_order(tmp_path):
    from halrp_fast.cli import main

    root = write_cifar100(tmp_path / "data", n_train=400, n_test=100)
    rc = main(["run", "--benchmark", "cifar100-splits", "--data-dir", str(root), "--order", "B", "--tasks", "2",
               "--epochs", "2", "--out", str(tmp_path / "out"), "--no-progress", "--quiet"])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["order"] == "B" and results["meta"]["task_names"][:2] == ["cifar100-split1",
                                                                                    "cifar100-split7"]


def test_orders_and_repeats_give_opd_and_a_merged_report(tmp_path):
    from halrp_fast.cli import main

    root = write_cifar100(tmp_path / "data", n_train=300, n_test=100)
    out = tmp_path / "runs"
    rc = main(["run", "--benchmark", "cifar100-splits", "--data-dir", str(root), "--orders", "AB", "--repeats", "2",
               "--tasks", "2", "--epochs", "2", "--max-per-task", "20", "--out", str(out), "--no-progress", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["order_A_seed_0", "order_A_seed_1",
                                                                    "order_B_seed_0", "order_B_seed_1"]
    summary = json.loads((out / "report.json").read_text())
    assert summary["runs"] == 4 and summary["groups"]["cifar100-splits/lenet/A"]["runs"] == 2
    # the repeats share one data draw (the authors' repeats vary the network seed only)
    repeats = [json.loads((out / d / "results.json").read_text()) for d in ("order_A_seed_0", "order_A_seed_1")]
    assert [r["meta"]["data_seed"] for r in repeats] == [0, 0]
    assert [r["config"]["seed"] for r in repeats] == [0, 1]
    rob = summary["order_robustness"]["cifar100-splits"]
    # orders A and B share no task among their first two (A: splits 0, 1; B: splits 1, 7) except split 1
    assert set(rob["OPD"]) == {"cifar100-split1"}
    assert (out / "report.csv").read_text().startswith("run,benchmark")
    rc = main(["report", str(out / "order_A_seed_0"), str(out / "order_B_seed_0"), "--csv", str(tmp_path / "r.csv")])
    assert rc == 0 and (tmp_path / "r.csv").exists()


def test_subset_fraction(mnist_dir):
    data = load_mnist_like(mnist_dir)
    full = permuted_stream(data, 1, batch_size=8, valid_frac=0.25)
    half = permuted_stream(data, 1, batch_size=8, valid_frac=0.25, subset=0.5)
    assert full[0].train.dataset_size == 45 and half[0].train.dataset_size == 23  # ⌈45 / 2⌉ of the training part
    assert half[0].val.dataset_size == 15
    assert set(half[0].train.indices.tolist()) <= set(range(60))
    with pytest.raises(ValueError, match=r"subset must be in \(0, 1\]"):
        permuted_stream(data, 1, batch_size=8, subset=0.0)


def test_pmnist_needs_a_data_dir(tmp_path, mnist_dir, capsys):
    from halrp_fast.cli import main

    assert main(["run", "--benchmark", "pmnist", "--out", str(tmp_path / "o")]) == 2
    assert "PMNIST needs --data-dir" in capsys.readouterr().err
    rc = main(["run", "--benchmark", "pmnist", "--data-dir", str(mnist_dir), "--tasks", "2", "--epochs", "2",
               "--subset", "0.5", "--batch-size", "8", "--out", str(tmp_path / "p"), "--no-progress", "--quiet"])
    assert rc == 0


def _png_folder(root: Path, classes: list[str], n: int, size: tuple[int, int], mode: str) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (*size[::-1], 3) if mode == "RGB" else size[::-1]
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_five_datasets_from_every_file_format(tmp_path, mnist_dir):
    import pickle
    import shutil

    import numpy as np
    from scipy.io import savemat

    from halrp_fast.data.multi import five_datasets

    root = tmp_path / "five"
    rng = np.random.default_rng(0)
    c10 = root / "cifar10" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(c10 / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}, f)
    for sub in ("mnist", "fashion_mnist"):
        (root / sub).mkdir()
        for f in mnist_dir.glob("*-ubyte*"):
            shutil.copy(f, root / sub / f.name)
    (root / "svhn").mkdir()
    for split in ("train", "test"):
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 20), dtype=np.uint8),
                                                       "y": (np.arange(20) % 10 + 1).reshape(-1, 1)})
        _png_folder(root / "notmnist" / split, list("ABCDEFGHIJ"), 2, (28, 28), "L")
    tasks = five_datasets(root, batch_size=8, max_per_task=16)
    # the authors' order: their loader shuffles the five datasets with seed 0 (scikit-learn's shuffle)
    from sklearn.utils import shuffle

    authors = ["cifar10", "mnist", "svhn", "fashion_mnist", "notmnist"]
    assert [t.name for t in tasks] == [authors[i] for i in shuffle(np.arange(5), random_state=0)]
    # their normalisation: MNIST padded to 32×32 with mean 0.1 and std 0.2752 (padding included)
    x, _ = next(iter(tasks[2].test))
    torch.testing.assert_close(x[:, :, 0, 0], torch.full_like(x[:, :, 0, 0], -0.1 / 0.2752))
    for t in tasks:
        x, y = next(iter(t.train))
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y.min()) and int(y.max()) < 10
    assert set(torch.cat([y for _, y in tasks[0].test]).tolist()) == set(range(10))  # SVHN's label 10 is digit 0


def test_tinyimagenet_folder_layout(tmp_path):
    from halrp_fast.data.multi import load_tinyimagenet, tinyimagenet_stream

    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(4)]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # labels follow sorted wnids (ImageFolder)
    for w in wnids:
        _png_folder(root / "train" / w, ["images"], 3, (64, 64), "RGB")
        for p in (root / "train" / w / "images").iterdir():
            p.rename(p.with_suffix(".JPEG"))
    _png_folder(root / "val", ["images"], 8, (64, 64), "RGB")
    lines = [f"{i}.png\t{wnids[i % 4]}\t0\t0\t1\t1" for i in range(8)]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = load_tinyimagenet(tmp_path)
    assert data["train_images"].shape == (12, 3, 64, 64) and data["test_labels"].tolist() == [0, 1, 2, 3] * 2
    tasks = tinyimagenet_stream(data, 2, batch_size=4, valid_frac=0.0)
    assert [t.num_classes for t in tasks] == [2, 2]
    # training images are augmented (random crop with padding 4, flips), test images are not
    torch.manual_seed(0)
    a = torch.cat([x for x, _ in tasks[0].train])
    torch.manual_seed(1)
    b = torch.cat([x for x, _ in tasks[0].train])
    assert a.shape == (6, 3, 64, 64) and not torch.equal(a, b)
    assert torch.equal(torch.cat([x for x, _ in tasks[0].test]), torch.cat([x for x, _ in tasks[0].test]))
    # a third of each class validates: ⌊3 · 0.34⌋ = 1 image per class
    split = tinyimagenet_stream(data, 2, batch_size=1, valid_frac=0.34)
    assert split[0].val.dataset_size == 2 and split[0].train.dataset_size == 4
    assert sorted(data["train_labels"][split[0].val.indices].tolist()) == [0, 1]
    assert set(torch.cat([y for _, y in tasks[1].test]).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="do not split into 3 equal tasks"):
        tinyimagenet_stream(data, 3, batch_size=4)
    with pytest.raises(FileNotFoundError, match="TinyImageNet not found"):
        load_tinyimagenet(tmp_path / "nothing")
