"""Pins are copy-on-write: pin/unpin in one thread while another runs infer; batched pin values are checked."""

import threading

import pytest
import torch

import cellsheaf_nn as csnn
from cellsheaf_nn.train import mlp

F64 = torch.float64


def test_pin_and_unpin_while_another_thread_infers():
    ns = csnn.compile(mlp([2, 3, 1], seed=0))
    X = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    errors, stop = [], threading.Event()

    def pinner():
        while not stop.is_set():
            handles = [ns.pin("a1", [0], 0.5), ns.pin("z1", [1], 0.2, strength=2.0), ns.free_input([0])]
            for h in handles:
                ns.unpin(h)

    def runner():
        try:
            for _ in range(40):
                assert ns.infer(X, method="auto", check=False).shape == (4, 1)
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=pinner), threading.Thread(target=runner)]
    threads[0].start(), threads[1].start()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert errors == [] and ns.pins == []
    torch.testing.assert_close(ns.infer(X), ns.to_module()(X))


def test_pin_ids_stay_unique_across_threads():
    ns = csnn.compile(mlp([2, 3, 1], seed=0))
    handles = []

    def add():
        for _ in range(50):
            handles.append(ns.pin("z1", [0], 0.1, strength=1.0))

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({h.id for h in handles}) == 200 and len(ns.pins) == 200


def test_batched_pin_values_of_the_wrong_batch_size_name_the_pin():
    ns = csnn.compile(mlp([2, 3, 1], seed=0))
    ns.pin("a1", [1], torch.ones(3, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"hard pin \d+ at vertex 'a1' \(coords \[1\]\) has values for a batch of 3, "
                                         r"the inputs a batch of 8"):
        ns.infer(torch.zeros(8, 2, dtype=F64))
