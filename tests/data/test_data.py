"""Tensor index, datasets per mode, seeded loaders and augmentation."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bids_app.config import ExtractionMode, Task
from bids_app.data import dataset as data
from bids_app.data import tables as tensor_index
from bids_app.data.augment import build_augmentation
from bids_app.data.batches import RING_SLOTS
from bids_app.data.dataset import TensorDataset
from bids_app.data.sampling import make_loader, seed_worker
from bids_app.data.tables import encode_labels, index_tensors
from bids_app.derivatives import sidecar_path, tensor_path
from bids_app.errors import ConfigError, DataError
from bids_app.extraction.storage import write_tensor

SPACE = "MNI152NLin2009aSym"
# Stored tensor shape per mode: (n_parts, 1, ...) or (1, D, H, W) for images.
SHAPES = {
    ExtractionMode.IMAGE: (1, 6, 6, 6),
    ExtractionMode.PATCH: (4, 1, 3, 3, 3),
    ExtractionMode.SLICE: (5, 1, 6, 7),
    ExtractionMode.ROI: (2, 1, 3, 4, 5),
}


def write_tensors(
    output_dir: Path,
    mode: ExtractionMode,
    images: Iterable[tuple[str, str | None]],
    *,
    offsets: dict[str, float] | None = None,
    shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write one random float32 tensor per (participant label, session label) image; ``offsets`` adds signal."""
    rng = np.random.default_rng(seed)
    paths = []
    for participant, session in images:
        array = rng.random(shape or SHAPES[mode], dtype=np.float32)
        array += np.float32((offsets or {}).get(participant, 0.0))
        path = tensor_path(output_dir, participant, session, SPACE, mode.value, "T1w")
        sidecar = {
            "Mode": mode.value,
            "ModeParameters": {},
            "SourceSHA256": f"src-{participant}-{session}",
            "RawSourceSHA256": f"raw-{participant}-{session}",
        }
        write_tensor(path, array, sidecar)
        paths.append(path)
    return paths


def labelled_table(output_dir: Path, mode: ExtractionMode, labels: dict[str, str]) -> pd.DataFrame:
    """``index_tensors`` joined with a label per participant id (``sub-XX``)."""
    table = index_tensors(output_dir, mode)
    table["label"] = table["participant_id"].map(labels)
    return table


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_index_lists_complete_tensors_with_one_glob(output_dir: Path, monkeypatch, caplog) -> None:
    mode = ExtractionMode.PATCH
    write_tensors(output_dir, mode, [("02", "M000"), ("02", "M012"), ("01", None), ("03", "M000")])
    broken = sidecar_path(tensor_path(output_dir, "03", "M000", SPACE, mode.value, "T1w"))
    content = json.loads(broken.read_text())
    content["Complete"] = False
    broken.write_text(json.dumps(content))
    write_tensors(output_dir, ExtractionMode.IMAGE, [("01", None)])  # another mode: not listed
    calls = []
    original = Path.glob

    def counting_glob(self, pattern):
        calls.append(pattern)
        return original(self, pattern)

    monkeypatch.setattr(Path, "glob", counting_glob)
    with caplog.at_level(logging.WARNING, logger="bids_app.data.tables"):
        table = index_tensors(output_dir, mode)
    assert len(calls) == 1
    assert list(table.columns) == list(tensor_index.INDEX_COLUMNS)
    assert list(zip(table.participant_id, table.session_id, strict=True)) == [
        ("sub-01", "n/a"),
        ("sub-02", "ses-M000"),
        ("sub-02", "ses-M012"),
    ]
    assert table["n_parts"].tolist() == [4, 4, 4]
    assert table["sample_shape"].tolist() == [(1, 3, 3, 3)] * 3
    assert table["source_sha256"].tolist()[1] == "src-02-M000"
    assert table["raw_source_sha256"].tolist()[0] == "raw-01-None"
    assert "sub-03_ses-M000" in caplog.text and "incomplete" in caplog.text


def test_index_of_empty_output_is_empty(output_dir: Path) -> None:
    table = index_tensors(output_dir, ExtractionMode.IMAGE)
    assert table.empty and list(table.columns) == list(tensor_index.INDEX_COLUMNS)


@pytest.mark.parametrize("mode", list(ExtractionMode))
def test_dataset_samples_every_part(output_dir: Path, mode: ExtractionMode) -> None:
    paths = write_tensors(output_dir, mode, [("01", "M000"), ("02", "M000"), ("03", None)])
    table = labelled_table(output_dir, mode, {"sub-01": "CN", "sub-02": "AD", "sub-03": "CN"})
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding=encode_labels(table["label"]))
    n_parts = 1 if mode is ExtractionMode.IMAGE else SHAPES[mode][0]
    sample_shape = SHAPES[mode] if mode is ExtractionMode.IMAGE else SHAPES[mode][1:]
    assert len(dataset) == 3 * n_parts
    assert dataset.sample_table["part_id"].tolist() == list(range(n_parts)) * 3
    last = len(dataset) - 1
    x, y, index = dataset[last]
    assert x.dtype == torch.float32 and tuple(x.shape) == sample_shape
    assert index == last and y.dtype == torch.int64 and int(y) == 1  # sub-03 is CN: {"AD": 0, "CN": 1}
    stored = np.load(paths[2])
    expected = stored if mode is ExtractionMode.IMAGE else stored[n_parts - 1]
    assert np.array_equal(x.numpy(), expected)
    assert dataset.sample_table.iloc[last][["participant_id", "session_id"]].tolist() == ["sub-03", "n/a"]


def test_dataset_opens_each_file_once_and_never_globs(output_dir: Path, monkeypatch) -> None:
    mode = ExtractionMode.SLICE
    write_tensors(output_dir, mode, [("01", "M000"), ("02", "M000")])
    table = labelled_table(output_dir, mode, {"sub-01": "1.5", "sub-02": "2.5"})
    dataset = TensorDataset(table, mode, Task.REGRESSION, label_encoding=None)
    opened = []
    original_load = data.load_tensor

    def counting_load(path, mmap=True):
        opened.append((Path(path).name, mmap))
        return original_load(path, mmap=mmap)

    monkeypatch.setattr(data, "load_tensor", counting_load)
    monkeypatch.setattr(Path, "glob", lambda *a: pytest.fail("glob while reading samples"))
    monkeypatch.setattr(Path, "rglob", lambda *a: pytest.fail("rglob while reading samples"))
    for _ in range(2):
        targets = [float(dataset[i][1]) for i in range(len(dataset))]
    assert len(opened) == 2 and all(mmap for _, mmap in opened)
    assert isinstance(dataset._array(0), np.memmap)
    assert targets == [1.5] * 5 + [2.5] * 5


def test_labels_encoding_unlabelled_and_errors(output_dir: Path) -> None:
    mode = ExtractionMode.IMAGE
    write_tensors(output_dir, mode, [("01", None), ("02", None), ("03", None)])
    table = labelled_table(output_dir, mode, {"sub-01": "CN", "sub-02": "AD", "sub-03": "n/a"})
    assert encode_labels(["CN", "AD", "n/a", "CN"]) == {"AD": 0, "CN": 1}
    assert encode_labels(["CN", "AD"], classes=("CN", "AD")) == {"CN": 0, "AD": 1}
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding={"CN": 0, "AD": 1})
    assert dataset.sample_targets.tolist() == [0, 1, -1]
    with pytest.raises(DataError, match=r"'AD'.*not in the class mapping"):
        TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding={"CN": 0, "MCI": 1})
    table["label"] = ["70", "abc", "n/a"]
    with pytest.raises(DataError, match="abc"):
        TensorDataset(table, mode, Task.REGRESSION, label_encoding=None)
    reconstruction = TensorDataset(table.drop(columns="label"), mode, Task.RECONSTRUCTION, label_encoding=None)
    x, y, _ = reconstruction[1]
    assert torch.equal(x, y)


def test_cache_keeps_samples_in_memory(output_dir: Path) -> None:
    mode = ExtractionMode.ROI
    write_tensors(output_dir, mode, [("01", None)])
    table = index_tensors(output_dir, mode)
    cached = TensorDataset(table, mode, Task.RECONSTRUCTION, label_encoding=None, cache=True)
    plain = TensorDataset(table, mode, Task.RECONSTRUCTION, label_encoding=None)
    assert cached.read_sample(1) is cached.read_sample(1)
    assert plain.read_sample(1) is not plain.read_sample(1)
    assert np.array_equal(cached.read_sample(1), plain.read_sample(1))


def _batches(loader, epoch: int) -> list[tuple[list[int], np.ndarray]]:
    loader.sampler.set_epoch(epoch)
    return [(index.tolist(), x.numpy()) for x, _, index in loader]


def test_loader_order_and_augmentation_follow_seed_and_epoch(output_dir: Path) -> None:
    mode = ExtractionMode.PATCH
    write_tensors(output_dir, mode, [(f"{i:02d}", None) for i in range(4)])
    table = index_tensors(output_dir, mode)
    augment = build_augmentation(("flip", "bias_field", "gamma", "gaussian_noise", "intensity_scaling"), mode)
    dataset = TensorDataset(table, mode, Task.RECONSTRUCTION, label_encoding=None, augment=augment)

    def loader(seed: int, workers: int = 0):
        return make_loader(dataset, batch_size=5, seed=seed, shuffle=True, num_workers=workers)

    first = _batches(loader(7), epoch=0)
    assert sorted(i for indices, _ in first for i in indices) == list(range(16))
    again = _batches(loader(7), epoch=0)
    with_workers = _batches(loader(7, workers=2), epoch=0)
    for reference in (again, with_workers):
        assert [i for i, _ in reference] == [i for i, _ in first]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(reference, first, strict=True))
    assert [i for i, _ in _batches(loader(7), epoch=1)] != [i for i, _ in first]
    assert [i for i, _ in _batches(loader(8), epoch=0)] != [i for i, _ in first]
    unaugmented = np.stack([dataset.read_sample(i) for i in first[0][0]])
    assert not np.allclose(first[0][1], unaugmented)


def test_loader_settings(output_dir: Path) -> None:
    write_tensors(output_dir, ExtractionMode.IMAGE, [("01", None), ("02", None)])
    dataset = TensorDataset(
        index_tensors(output_dir, ExtractionMode.IMAGE), ExtractionMode.IMAGE, Task.RECONSTRUCTION, label_encoding=None
    )
    loader = make_loader(dataset, batch_size=2, seed=0, num_workers=1)
    assert loader.persistent_workers and not loader.pin_memory and loader.worker_init_fn is seed_worker
    assert not make_loader(dataset, batch_size=2, seed=0).persistent_workers
    assert [index.tolist() for _, _, index in make_loader(dataset, batch_size=1, seed=0)] == [[0], [1]]


def test_class_weighted_sampling_balances_classes(output_dir: Path) -> None:
    mode = ExtractionMode.IMAGE
    write_tensors(output_dir, mode, [(f"{i:02d}", None) for i in range(10)])
    labels = {f"sub-{i:02d}": ("AD" if i < 2 else "CN") for i in range(10)}
    table = labelled_table(output_dir, mode, labels)
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1})
    loader = make_loader(dataset, batch_size=10, seed=3, shuffle=True, class_weighted=True)
    drawn = []
    for epoch in range(40):
        loader.sampler.set_epoch(epoch)
        drawn += [int(v) for _, y, _ in loader for v in y]
    share_ad = drawn.count(0) / len(drawn)
    assert 0.4 < share_ad < 0.6  # 0.2 without weighting
    loader.sampler.set_epoch(5)
    repeat = [int(v) for _, y, _ in loader for v in y]
    assert repeat == drawn[50:60]
    regression = TensorDataset(table.assign(label="1"), mode, Task.REGRESSION, label_encoding=None)
    with pytest.raises(ConfigError, match="class_weighted_sampling"):
        make_loader(regression, batch_size=2, seed=0, class_weighted=True)


def _all_samples(dataset: TensorDataset) -> list[np.ndarray]:
    return [dataset[i][0].numpy() for i in range(len(dataset))]


@pytest.mark.parametrize("mode", list(ExtractionMode))
def test_cache_returns_the_uncached_samples_bit_for_bit(output_dir: Path, mode: ExtractionMode) -> None:
    write_tensors(output_dir, mode, [("01", None), ("02", None), ("03", None)])
    table = index_tensors(output_dir, mode)
    plain = TensorDataset(table, mode, Task.RECONSTRUCTION, label_encoding=None)
    cached = TensorDataset(table, mode, Task.RECONSTRUCTION, label_encoding=None, cache=True)
    expected = _all_samples(plain)
    first = [x.numpy().copy() for x, _, _ in make_loader(cached, batch_size=2, seed=0)]
    assert len(cached._cached) == len(cached)
    for path in table["tensor_path"]:  # the second epoch must come from memory alone
        Path(path).write_bytes(b"")
    second = [x.numpy() for x, _, _ in make_loader(cached, batch_size=2, seed=0)]
    for batches in (first, second):
        assert np.array_equal(np.concatenate(batches), np.stack(expected))
    assert all(np.array_equal(a, b) for a, b in zip(_all_samples(cached), expected, strict=True))
    assert not cached.read_sample(0).flags.writeable  # a cached sample cannot be changed by a caller


def test_float16_tensors_load_as_float32_samples(output_dir: Path) -> None:
    mode = ExtractionMode.PATCH
    paths = write_tensors(output_dir, mode, [("01", None), ("02", None)])
    for path in paths:  # rewrite as float16, as `--tensor-dtype float16` extraction stores them
        write_tensor(path, np.load(path).astype(np.float16), {"Mode": mode.value})
    table = index_tensors(output_dir, mode)
    stored = np.concatenate([np.load(p) for p in paths]).astype(np.float32)
    for cache in (False, True):
        dataset = TensorDataset(table, mode, Task.RECONSTRUCTION, label_encoding=None, cache=cache)
        for _ in range(2):  # the second pass reads the cache when there is one
            batches = [x for x, _, _ in make_loader(dataset, batch_size=3, seed=0)]
            assert all(x.dtype == torch.float32 for x in batches)
            assert np.array_equal(torch.cat(batches).numpy(), stored)
        assert dataset.read_sample(5).dtype == np.float32 and np.array_equal(dataset.read_sample(5), stored[5])
        assert all(a.dtype == np.float16 for a in dataset._cached.values())  # cached at half the size
    assert np.array_equal(dataset[2][0].numpy(), stored[2])


@pytest.mark.parametrize("mode", [ExtractionMode.SLICE, ExtractionMode.IMAGE])
def test_a_process_checks_and_opens_each_file_once(output_dir: Path, mode: ExtractionMode, monkeypatch) -> None:
    """Parts are copied from kept memory maps, whole images read with pread from kept descriptors."""
    paths = write_tensors(output_dir, mode, [("01", None), ("02", None), ("03", None)])
    dataset = TensorDataset(index_tensors(output_dir, mode), mode, Task.RECONSTRUCTION, label_encoding=None)
    checked: list[str] = []
    opened: list[str] = []
    original_load, original_open = data.load_tensor, os.open
    monkeypatch.setattr(data, "load_tensor", lambda p, mmap=True: checked.append(Path(p).name) or original_load(p))

    def counting_open(path, *args, **kwargs):
        if str(path).endswith(".npy"):
            opened.append(Path(path).name)
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr(data.os, "open", counting_open)
    loader = make_loader(dataset, batch_size=4, seed=0, shuffle=True)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        assert sum(len(x) for x, _, _ in loader) == len(dataset)
    names = sorted(p.name for p in paths)
    assert sorted(checked) == names
    assert sorted(opened) == (names if mode is ExtractionMode.IMAGE else [])
    assert len(dataset._maps) == (0 if mode is ExtractionMode.IMAGE else 3)
    monkeypatch.setattr(data, "MAX_OPEN_TENSORS", 1)  # closed ones are reopened; the limit holds
    fresh = TensorDataset(index_tensors(output_dir, mode), mode, Task.RECONSTRUCTION, label_encoding=None)
    assert np.array_equal(np.stack(_all_samples(fresh)), np.stack(_all_samples(dataset)))
    assert len(fresh._fds) + len(fresh._maps) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_are_never_overwritten(output_dir: Path, workers: int) -> None:
    """Batch buffers are reused only once nothing refers to them (more batches than buffers here)."""
    mode = ExtractionMode.SLICE
    write_tensors(output_dir, mode, [(f"{i:02d}", None) for i in range(6)])
    table = labelled_table(output_dir, mode, {f"sub-{i:02d}": str(i) for i in range(6)})
    dataset = TensorDataset(table, mode, Task.REGRESSION, label_encoding=None)
    expected = np.stack(_all_samples(dataset))
    loader = make_loader(dataset, batch_size=2, seed=1, shuffle=True, num_workers=workers)
    assert len(loader) > 2 * RING_SLOTS
    held = list(loader)
    views = [x[0] for x, _, _ in held]  # a view alone also keeps its batch's buffer
    del held
    streamed = [(x.clone(), y.clone(), index.clone()) for x, y, index in loader]
    order = loader.sampler.__iter__()
    assert [i for i, _ in order] == torch.cat([index for _, _, index in streamed]).tolist()
    for x, y, index in streamed:
        assert np.array_equal(x.numpy(), expected[index.numpy()])
        assert y.tolist() == [float(dataset.sample_table["label"][i]) for i in index.tolist()]
    first_indices = [int(x) for x in torch.cat([index for _, _, index in streamed])[::2]]
    assert all(np.array_equal(v.numpy(), expected[i]) for v, i in zip(views, first_indices, strict=True))
    if workers == 0:
        del views, streamed
        assert dataset._ring is not None and not dataset._ring.flags.any()  # every buffer free again


def test_sample_batches_work_with_the_default_collate(output_dir: Path) -> None:
    mode = ExtractionMode.ROI
    write_tensors(output_dir, mode, [("01", None), ("02", None)])
    table = labelled_table(output_dir, mode, {"sub-01": "CN", "sub-02": "AD"})
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1})
    plain = list(torch.utils.data.DataLoader(dataset, batch_size=3))  # as prediction builds it
    fast = list(make_loader(dataset, batch_size=3, seed=0))
    assert len(plain) == len(fast) == 2
    for (x1, y1, i1), (x2, y2, i2) in zip(plain, fast, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2) and y2.dtype == torch.int64


def test_bad_files_fail_with_data_errors(output_dir: Path) -> None:
    mode = ExtractionMode.PATCH
    write_tensors(output_dir, mode, [("01", None), ("02", None)])
    write_tensors(output_dir, mode, [("02", None)], shape=(4, 1, 2, 2, 2))
    dataset = TensorDataset(index_tensors(output_dir, mode), mode, Task.RECONSTRUCTION, label_encoding=None)
    with pytest.raises(DataError, match=r"sub-02.*shape \(1, 2, 2, 2\), not \(1, 3, 3, 3\)"):
        dataset.__getitems__([0, 4])
    image = ExtractionMode.IMAGE
    paths = write_tensors(output_dir, image, [("01", None)])
    images = TensorDataset(index_tensors(output_dir, image), image, Task.RECONSTRUCTION, label_encoding=None)
    images.read_sample(0)  # checked and open; then the file loses its end
    with paths[0].open("r+b") as handle:
        handle.truncate(paths[0].stat().st_size - 10)
    with pytest.raises(DataError, match="truncated"):
        images.read_sample(0)
