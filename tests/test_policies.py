import pytest

from kvmw.errors import ConfigError
from kvmw.storage_tiers.base import CapacityIndex
from kvmw.storage_tiers.policies import LFU, LRU, PGDSF, make_policy


def test_lru_evicts_least_recently_used():
    p = LRU()
    for k in "abc":
        p.insert(k, 1)
    p.access("a")
    assert p.victim() == "b"
    p.evicted("b")
    assert p.victim() == "c"


def test_lfu_evicts_least_frequent_oldest_first():
    p = LFU()
    for k in "abc":
        p.insert(k, 1)
    p.access("a"), p.access("a"), p.access("c")
    assert p.victim() == "b"
    p.evicted("b")
    assert p.victim() == "c"
    p.remove("c")
    assert p.victim() == "a"


def test_pgdsf_prefers_keeping_costly_small_entries_and_ages():
    p = PGDSF()
    p.insert("cheap_big", size=1000, cost=1.0)
    p.insert("costly_small", size=10, cost=5.0)
    assert p.victim() == "cheap_big"
    p.evicted("cheap_big")
    # clock advanced to the victim's priority: a new entry starts above old cold ones
    p.insert("new", size=1000, cost=1.0)
    assert p._priority("new") > 1.0 / 1000
    # frequency raises priority
    p.insert("hot", size=1000, cost=1.0)
    for _ in range(50):
        p.access("hot")
    assert p.victim() != "hot"


def test_capacity_index_bounds_bytes():
    idx = CapacityIndex(100, make_policy("lru"))
    assert idx.make_room("a", 60) == []
    idx.add("a", 60)
    victims = idx.make_room("b", 60)
    assert victims == ["a"] and idx.used == 0
    idx.add("b", 60)
    assert idx.make_room("huge", 101) is None
    assert idx.make_room("b", 100) == [] and idx.used == 0  # overwrite frees the old bytes


def test_unknown_policy():
    with pytest.raises(ConfigError):
        make_policy("fifo-ish")


def test_heap_compaction_keeps_order():
    p = LFU()
    for i in range(10):
        p.insert(str(i), 1)
    for _ in range(200):
        for i in range(1, 10):
            p.access(str(i))
    assert p.victim() == "0" and len(p._heap) < 4 * 10 + 64 + 10
