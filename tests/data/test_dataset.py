"""Batches of oztune.data.dataset: length-bucketed training batches, longest-first inference batches."""

from __future__ import annotations

import numpy as np

from oztune.data.dataset import inference_batches, train_batches


def test_bucketed_training_batches_put_the_shortest_examples_together():
    lengths = np.arange(10)
    batches = train_batches(lengths, 3, seed=0, bucket=50)  # one mega-batch of 10, sorted: 3, 3, 3 and 1
    short = [b for b in batches if len(b) == 1]
    assert len(short) == 1 and lengths[short[0]].tolist() == [0]


def test_inference_batches_run_the_longest_first():
    assert list(next(inference_batches(np.array([1, 5, 3]), 1))) == [1]
