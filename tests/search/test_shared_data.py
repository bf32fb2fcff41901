"""One copy of the data per node: splits shared through Ray's object store (search/shared_data.py).

The memory test measures what each holder (a stand-in for a Tune trial or a Ray Train rank)
adds: its USS growth (pages private to it; the object store's pages are shared) and the
node's growth, the sum of PSS (each shared page split among the processes that map it) over
the driver and the holders. `pytest -s` prints the numbers.
"""
from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import psutil
import pytest
import ray
import torch

from data_pipeline.loader import SplitTensors, load_splits
from data_pipeline.presets import MODALITIES
from data_pipeline.store import write_store
from data_pipeline.synth import synthesize
from search.shared_data import SharedSplits, share_splits

pytestmark = pytest.mark.integration

MB = 1e6


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """MOSI shapes, half its samples: ~220 MB of features, far above the noise of a process."""
    return write_store(synthesize("mosi", seed=1, scale=0.5), tmp_path_factory.mktemp("big") / "mosi")


def split_arrays(data: SplitTensors) -> list:
    tensors = [data.labels, *data.features.values(), *([] if data.text_bert is None else [data.text_bert])]
    return [data.ids, data.keys, *data.lengths.values(), *tensors]


def nbytes(splits: dict[str, SplitTensors]) -> int:
    return sum(a.nbytes for data in splits.values() for a in split_arrays(data))


def assert_same_split(got: SplitTensors, want: SplitTensors) -> None:
    assert got.spec == want.spec and got.split == want.split
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.keys, want.keys)
    assert got.labels.dtype == want.labels.dtype and torch.equal(got.labels, want.labels)
    for m in MODALITIES:
        assert got.features[m].dtype == want.features[m].dtype and torch.equal(got.features[m], want.features[m])
        assert got.lengths[m].dtype == want.lengths[m].dtype
        np.testing.assert_array_equal(got.lengths[m], want.lengths[m])
    assert (got.text_bert is None) == (want.text_bert is None)
    if want.text_bert is not None:
        assert got.text_bert.dtype == want.text_bert.dtype and torch.equal(got.text_bert, want.text_bert)


@ray.remote(num_cpus=0)
def load_in_task(shared: SharedSplits) -> tuple[dict[str, SplitTensors], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = shared.load()
    return splits, [str(w.message) for w in caught]


@ray.remote(num_cpus=0)
def relay(shared: SharedSplits):
    """A Tune trial that hands the handle on to the Ray Train workers it starts."""
    return ray.get(load_in_task.remote(shared))


def test_shared_splits_equal_the_store_read_in_a_nested_task(local_ray, tiny_store):
    shared = share_splits(tiny_store)
    # As tune.with_parameters does: the handle travels inside another object of the store.
    splits, caught = ray.get(relay.remote(ray.put(shared)))
    want = load_splits(tiny_store)
    assert list(splits) == list(want)
    for split in want:
        assert_same_split(splits[split], want[split])
    assert caught == []


def test_the_handle_pickles_small(local_ray, tiny_store):
    shared = share_splits(tiny_store)
    assert len(pickle.dumps(shared)) < 4096


def test_share_splits_refuses_without_ray(monkeypatch, tiny_store):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="load_splits"):
        share_splits(tiny_store)


@ray.remote(num_cpus=0)
class Holder:
    """Loads the splits and keeps them, as a trial or a rank does while it trains."""

    def __init__(self):
        self.splits = None

    def pid(self) -> int:
        return os.getpid()

    def load(self, source: SharedSplits | str) -> int:
        """This process's USS growth (bytes) from loading and reading every split."""
        process = psutil.Process()
        self.splits = None
        before = process.memory_full_info().uss
        splits = source.load() if isinstance(source, SharedSplits) else load_splits(source)
        for data in splits.values():  # read every byte, as an epoch does: every page is mapped
            for t in [data.labels, *data.features.values(), data.text_bert]:
                float(t.sum())
        self.splits = splits
        return process.memory_full_info().uss - before


def node_pss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids)


def load_in(holders: list, source: SharedSplits | str) -> tuple[list[int], int]:
    """Per holder USS growth and the node's growth (sum of PSS over the driver and holders)."""
    pids = [os.getpid(), *ray.get([h.pid.remote() for h in holders])]
    before = node_pss(pids)
    growth = ray.get([h.load.remote(source) for h in holders])  # concurrently
    return growth, node_pss(pids) - before


def test_two_holders_on_a_node_share_one_copy(local_ray, big_store):
    shared = share_splits(big_store)
    size = nbytes(shared.load())  # in the driver too, without a copy
    holders = [Holder.remote() for _ in range(2)]
    try:
        shared_growth, shared_node = load_in(holders, shared)
        # The contrast, in the same processes (each load first drops what it held).
        copy_growth, copy_node = load_in(holders, str(big_store))
    finally:
        for h in holders:
            ray.kill(h)
    print(f"\ndataset {size / MB:.0f} MB; per holder USS growth and node PSS growth, 2 holders:\n"
          f"  shared through the object store: {[round(g / MB, 1) for g in shared_growth]} MB, "
          f"node {shared_node / MB:.1f} MB\n"
          f"  load_splits in each holder:      {[round(g / MB, 1) for g in copy_growth]} MB, "
          f"node {copy_node / MB:.1f} MB")
    assert all(g < 0.25 * size for g in shared_growth)
    assert shared_node < 0.5 * size
    # Each copy is a dataset or more, so the measurement can fail.
    assert all(g > 0.75 * size for g in copy_growth)
    assert copy_node > 1.5 * size
