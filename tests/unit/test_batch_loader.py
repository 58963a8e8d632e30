"""The batch loader (data/loader.py): batches assembled off the training loop, by a thread or by
worker processes, are exactly the batches the iterator gives in the loop, in order, from any start."""
import os
import threading
import time

import pytest
import torch

from prosec_mcore.data import build_datasets, build_tokenizer, make_batch_iterator
from prosec_mcore.data.loader import BatchLoader


@pytest.fixture(scope="module")
def shakespeare_train(shakespeare_corpus, tmp_path_factory):
    prepare_dir = shakespeare_corpus[0].split("=", 1)[1]
    tokenizer = build_tokenizer("hf_json", os.path.join(prepare_dir, "tokenizer.json"))
    train, _, _ = build_datasets(os.path.join(prepare_dir, "shakespeare_text_document"), tokenizer, 32, "90,10,0",
                                 7, (256, 0, 0), str(tmp_path_factory.mktemp("index_cache")))
    return train


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers,prefetch", [(0, 0), (0, 2), (2, 1), (3, 2)])
def test_loader_yields_the_iterators_batches_in_order_from_any_start(shakespeare_train, workers, prefetch):
    # G=8 over dp=2, micro 2: rank 1 has 2 micro-batches per iteration
    batches = make_batch_iterator(shakespeare_train, 8, 2, dp_rank=1, dp_size=2)
    loader = BatchLoader(batches, start_iteration=3, end_iteration=7, num_workers=workers, prefetch=prefetch)
    got = list(loader)
    loader.close()
    assert [index for index, _ in got] == [3, 4, 5, 6]
    for index, micro in got:
        expected = batches.microbatches(index)
        assert len(micro) == len(expected) == 2
        assert all(_same(a, b) for a, b in zip(micro, expected))
        assert micro[0]["global_batch_index"][0] == index  # iteration 3 is global batch 3
    assert loader.wait_s >= 0.0


class _RecordingSource:
    """A real dataset that records which sample indices were read, and by which thread."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads.append((i, threading.current_thread().name))
        return self.dataset[i]


def test_thread_assembles_the_next_iterations_before_they_are_asked_for(shakespeare_train):
    source = _RecordingSource(shakespeare_train)
    batches = make_batch_iterator(source, 4, 2, 0, 1)
    loader = BatchLoader(batches, start_iteration=0, end_iteration=10, num_workers=0, prefetch=2)
    deadline = time.time() + 10
    # without any next(): iterations 0 and 1 (samples 0..7) are read ahead, off the main thread
    while len({i for i, _ in source.reads}) < 8 and time.time() < deadline:
        time.sleep(0.01)
    loader.close()
    ahead = {i for i, name in source.reads if name == "prosec-batch-prefetch"}
    assert set(range(8)) <= ahead, sorted(ahead)
    assert max(i for i, _ in source.reads) < 4 * 3 + 4  # at most prefetch + 1 iterations are read ahead


class _FailingSource:
    def __len__(self):
        return 100

    def __getitem__(self, i):
        if i >= 8:
            raise ValueError("shard x.tar: sample 0000000008 has no tokens.npy")
        return {"tokens": torch.zeros(4, dtype=torch.long)}


def test_a_data_error_in_the_thread_reaches_the_training_loop():
    loader = BatchLoader(make_batch_iterator(_FailingSource(), 4, 4, 0, 1), 0, 5, num_workers=0, prefetch=2)
    assert next(loader)[0] == 0 and next(loader)[0] == 1
    with pytest.raises(ValueError, match="has no tokens.npy"):
        next(loader)
    loader.close()


def test_bad_settings_are_refused():
    batches = make_batch_iterator(_FailingSource(), 4, 4, 0, 1)
    with pytest.raises(ValueError, match="data.num_workers and data.prefetch"):
        BatchLoader(batches, 0, 5, num_workers=-1)
    assert list(BatchLoader(batches, 5, 5)) == []  # nothing left to train
