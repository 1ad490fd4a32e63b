"""The pipelined update's feed on its own (plain threads, no Ray): backpressure, closing,
the relay chain."""

import threading

import pytest

from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.errors import StateError
from fd_ray_sync.feed import BucketFeed, relay_plan


def test_the_feed_holds_the_trainer_back_until_every_rank_wrote():
    """The coordinator's feed on its own (plain threads): the trainer's wait returns once
    every rank reported the bucket written; ranks wait for buckets; closing wakes all."""
    feed = BucketFeed(ranks=2, keep=False)
    meta = [BucketMeta(index=i, tensors=()) for i in range(3)]
    feed.add(meta[0], "ref0")
    feed.add(meta[1], "ref1")
    returned = threading.Event()
    t = threading.Thread(target=lambda: (feed.wait_written(0, 5), returned.set()))
    t.start()
    assert feed.take(0, 0, -1, timeout=5).ref == "ref0"
    assert feed.take(0, 1, 0, timeout=5).ref == "ref1"  # rank 0 wrote bucket 0
    assert not returned.wait(0.3)  # rank 1 has not
    assert feed.take(1, 1, 0, timeout=5).meta == meta[1]
    assert returned.wait(5)
    t.join()
    assert feed.refs()[:2] == (None, "ref1")  # keep=False: a bucket all ranks wrote is freed
    errors = []

    def take_next():
        try:
            feed.take(0, 2, 1, timeout=5)
        except StateError as e:
            errors.append(str(e))

    waiter = threading.Thread(target=take_next)
    waiter.start()
    feed.close("the update failed")
    waiter.join(5)
    assert errors == ["the update failed"]
    with pytest.raises(StateError, match="the update failed"):
        feed.add(meta[2], "ref2")


def test_the_relay_chain_starts_next_to_the_trainer_and_each_node_feeds_the_next():
    nodes = {0: "A", 1: "A", 2: "B", 3: "B", 4: "T", 5: "C"}  # T: the trainer's node
    source, relayers = relay_plan(nodes, trainer_node="T")
    assert source == {"B": "A", "C": "B"}  # A fetches from T; nobody fetches from C
    assert relayers == {0, 2}  # the lowest rank of A and of B re-puts for the next node
    assert relay_plan({0: "A", 1: "A", 2: "T"}, "T") == ({}, set())  # one node: no chain


def test_a_relay_chain_widens_the_trainers_window_by_its_hops():
    feed = BucketFeed(ranks=3, keep=True)
    feed.chain({0: "A", 1: "B", 2: "C"}, trainer_node="T")  # T -> A -> B -> C
    assert feed.widen == 2
    feed.wait_written(1, timeout=0.1)  # nothing written yet: buckets 0-3 may be out at once
    with pytest.raises(StateError, match="did not write 0"):
        feed.wait_written(2, timeout=0.1)  # a fifth waits for every rank to write bucket 0
    direct = BucketFeed(ranks=2, keep=True)
    direct.chain({0: "A", 1: "A"}, trainer_node="T")  # one node: no chain, no widening
    with pytest.raises(StateError, match="did not write 0"):
        direct.wait_written(0, timeout=0.1)


def test_a_rank_gets_its_nodes_copy_once_the_node_before_relayed_it():
    feed = BucketFeed(ranks=2, keep=True)
    feed.node_of = {0: "A", 1: "B"}
    feed.source, feed.relayers = {"B": "A"}, {0}
    feed.add(BucketMeta(index=0, tensors=()), "origin0")
    first = feed.take(0, 0, -1, timeout=5)
    assert (first.ref, first.relay) == ("origin0", True)
    with pytest.raises(StateError, match="bucket 0 did not arrive"):
        feed.take(1, 0, -1, timeout=0.2)  # node A has not handed its copy on yet
    feed.relay("A", 0, "copy-on-A")
    second = feed.take(1, 0, -1, timeout=5)
    assert (second.ref, second.origin, second.relay) == ("copy-on-A", "origin0", False)


def test_wait_closed_wakes_a_watcher_when_the_feed_closes():
    """The coordinator's trainer watch waits on this between its liveness questions."""
    feed = BucketFeed(ranks=1, keep=False)
    assert not feed.wait_closed(0.05)
    woken = []

    def rank():
        try:
            feed.take(0, 0, -1, timeout=5)
        except StateError as e:
            woken.append(str(e))

    waiter = threading.Thread(target=rank, daemon=True)
    waiter.start()
    feed.close("the trainer (driver of job 01000000, pid 1) died")
    assert feed.wait_closed(0.05)
    waiter.join(5)
    assert woken == ["the trainer (driver of job 01000000, pid 1) died"]  # woken at once
    with pytest.raises(StateError, match="the trainer .* died"):
        feed.take(0, 0, -1, timeout=5)
