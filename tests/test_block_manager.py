"""BlockManager: every block comes back, prefix hits are exact, eviction is least recently freed."""

from __future__ import annotations

import random

import pytest

from moeserve.engine.block_manager import BlockManager


def _admit(bm: BlockManager, prompt: list[int]) -> tuple[list[int], int] | None:
    """What the scheduler does for a new prompt: look up hits, allocate, publish full blocks."""
    hits = bm.lookup_prefix(prompt)
    table: list[int] = []
    if not bm.allocate(table, len(prompt), hits):
        return None
    bm.cache_full_blocks(table, prompt, [])
    return table, len(hits) * bm.block_size


def test_blocks_come_back_after_random_allocations_and_frees():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[list[int]] = []
    for _ in range(500):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        prompt = [rng.randrange(3) for _ in range(rng.randint(1, 20))]  # small alphabet: many shared prefixes
        got = _admit(bm, prompt)
        if got is None:
            continue
        table, computed = got
        assert computed % 4 == 0 and computed < len(prompt)
        assert len(table) == bm.blocks_needed(len(prompt))
        grown = len(prompt) + rng.randint(0, 9)
        if bm.allocate(table, grown):
            assert len(table) == bm.blocks_needed(grown)
        live.append(table)
    for table in live:
        bm.free(table)
    assert bm.num_free_blocks == 64
    assert bm.stats.hits > 0


def test_prefix_hit_shares_blocks_and_needs_the_whole_prefix_equal():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))  # two full blocks + 2 tokens
    a, computed = _admit(bm, prompt)
    assert computed == 0
    b, computed = _admit(bm, prompt[:8] + [99, 98, 97])
    assert computed == 8 and b[:2] == a[:2] and b[2] != a[2]
    c, computed = _admit(bm, [0, 1, 2, 3, 7, 7, 7, 7, 8])
    assert computed == 4 and c[0] == a[0] and c[1] != a[1]
    d, computed = _admit(bm, [5] + prompt[1:])  # same second block, different first
    assert computed == 0 and d[1] != a[1]
    assert bm.stats.hits == 3


def test_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    a, _ = _admit(bm, prompt)
    b, computed = _admit(bm, prompt)
    assert computed == 4 and b[0] == a[0] and b[1] != a[1]


def test_freed_cached_blocks_are_revived_then_evicted_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    p = [1, 2, 3, 4, 5]
    a, _ = _admit(bm, p)
    first = list(a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b, computed = _admit(bm, p)  # revived from the free queue
    assert computed == 4 and b[:2] == first[:2]
    bm.free(b)
    # Free queue now (oldest first): [3rd block of the first run, spare, block [3, 4], block [1, 2]]
    # because tables are freed tail first; 3 new blocks evict up to [3, 4] and keep [1, 2].
    x, computed = _admit(bm, [9, 9, 9, 9, 9])
    assert computed == 0 and first[0] not in x and first[1] in x
    bm.free(x)
    y, computed = _admit(bm, p)
    assert computed == 2 and y[0] == first[0]


def test_not_enough_blocks_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert _admit(bm, list(range(9))) is None
    assert bm.num_free_blocks == 2
    table, _ = _admit(bm, [1, 2, 3])
    assert not bm.allocate(table, 12)
    assert len(table) == 1 and bm.num_free_blocks == 1
    stale = list(table)
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 2
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(stale)


def test_blocks_keyed_a_window_at_a_time_get_the_keys_of_the_whole_sequence():
    """The scheduler keys a running sequence's newly filled blocks from just their tokens
    (Request.token_range); the keys, and so the prefix hits, are those of keying it whole."""
    from moeserve.engine.request import Request
    from moeserve.sampling_params import SamplingParams

    rng = random.Random(1)
    prompt = [rng.randrange(50) for _ in range(10)]
    req = Request("r", prompt, SamplingParams(), frozenset(), 100)
    whole_bm, window_bm = BlockManager(num_blocks=16, block_size=4), BlockManager(num_blocks=16, block_size=4)
    whole_table, window_table, whole_keys = [], [], []
    assert whole_bm.allocate(whole_table, 40) and window_bm.allocate(window_table, 40)
    for _ in range(30):
        req.output_token_ids.append(rng.randrange(50))
        first = len(req.block_keys) * 4
        window_bm.cache_full_blocks(window_table, req.token_range(first, req.num_tokens), req.block_keys, b"", first)
        assert req.token_range(first, req.num_tokens) == req.all_token_ids[first:]
    whole_bm.cache_full_blocks(whole_table, req.all_token_ids, whole_keys)
    assert req.block_keys == whole_keys and len(whole_keys) == 10
    with pytest.raises(ValueError, match="miss block"):
        window_bm.cache_full_blocks(window_table, [1, 2, 3, 4], [], b"", 4)
