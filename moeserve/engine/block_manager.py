"""KV-cache block manager: fixed-size blocks, reference counts, automatic prefix caching.

Every block is in exactly one of two states:

    in use   ref_count > 0, owned by one or more sequences' block tables
    free     ref_count == 0, in `_free` (oldest-freed first); a free block may still hold a
             cached full block of tokens (its key is in `_cached`) until it is reused

A *full* block's key chains the keys of all blocks before it (sha256 over parent key + token
ids), so two sequences share a block only if their whole prefixes up to it are equal. Prefix
hits revive free cached blocks or share in-use ones; a new block is taken from the front of the
free queue (least recently freed), and its old key, if any, is evicted then. `_free` is an
ordered dict, not a list, because a hit removes a block from the middle of the queue in O(1).
Sequences free their blocks tail first, so a sequence's last blocks are evicted before its
first ones (the shared prefixes live longest).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence


def block_key(parent: bytes | None, tokens: Sequence[int], salt: bytes = b"") -> bytes:
    """Key of a full block given its parent's key (None for the first block) and `salt`, what
    else its keys/values depend on: the expert configuration it was computed under (a block
    computed with fewer experts per token holds other keys/values than the same tokens at the
    model's K, so the two must never be shared)."""
    h = hashlib.sha256(parent or b"")
    h.update(salt + b"|")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


@dataclass
class PrefixCacheStats:
    hits: int = 0  # blocks a new sequence started with instead of computing them


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._key[block]
        if key is not None:
            del self._cached[key]
            self._key[block] = None
        self._ref[block] = 1
        return block

    def _prefix_keys(self, token_ids: Sequence[int], salt: bytes) -> list[bytes]:
        keys, parent = [], None
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            parent = block_key(parent, token_ids[start : start + self.block_size], salt)
            keys.append(parent)
        return keys

    def lookup_prefix(self, token_ids: Sequence[int], salt: bytes = b"") -> list[int]:
        """Cached blocks holding a prefix of `token_ids` (changes nothing; `allocate` counts hits).

        Hits stop before the block holding the last token: the model needs at least that token
        to run and give logits for, and recomputing it must not write into a shared block.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in self._prefix_keys(token_ids[: len(token_ids) - 1], salt):
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, table: list[int], num_tokens: int, hits: Sequence[int] = ()) -> bool:
        """Make `table` (empty, or a running sequence's) hold `num_tokens`, starting an empty
        table with the prefix-hit blocks `hits`. False, with nothing changed, when too few
        blocks are free."""
        assert not hits or not table, "prefix hits only start a new table"
        revived = sum(1 for b in hits if self._ref[b] == 0)
        needed = max(self.blocks_needed(num_tokens) - len(table) - len(hits), 0)
        if needed + revived > len(self._free):
            return False
        for block in hits:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        table.extend(hits)
        table.extend(self._take_free() for _ in range(needed))
        self.stats.hits += len(hits)
        return True

    def cache_full_blocks(self, table: list[int], token_ids: Sequence[int], keys: list[bytes],
                          salt: bytes = b"", start: int = 0) -> None:
        """Publish the full blocks of `token_ids` (a sequence's tokens from position `start` up
        to the end of what is scheduled; `start` at most len(keys) * block_size, so that every
        block not yet keyed is in it); `keys` is that sequence's list of full-block keys so far,
        extended in place.

        Called at scheduling time: a block's key depends only on its tokens, and a sibling
        scheduled later in the same step may read what this step writes, since every layer
        writes the whole step's keys/values before it attends. If the step then fails, its
        blocks were never written and the scheduler withdraws their keys (`uncache`).
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        if start > len(keys) * bs:
            raise ValueError(f"tokens from position {start} miss block {len(keys)}'s")
        for i in range(len(keys), (start + len(token_ids)) // bs):
            key = block_key(keys[-1] if keys else None, token_ids[i * bs - start : (i + 1) * bs - start], salt)
            keys.append(key)
            block = table[i]
            if self._key[block] is None and key not in self._cached:
                self._key[block] = key
                self._cached[key] = block

    def uncache(self, blocks: Sequence[int]) -> None:
        """Withdraw the keys of `blocks` (their contents were never written, e.g. the step that
        was to write them failed): no later lookup may hit them."""
        for block in blocks:
            key = self._key[block]
            if key is not None:
                del self._cached[key]
                self._key[block] = None

    def free(self, table: list[int]) -> None:
        """Release a sequence's blocks, last block first."""
        for block in reversed(table):
            if self._ref[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None
        table.clear()
