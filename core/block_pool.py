"""The paged KV block pool with prefix caching.

A block holds `block_size` tokens of KV. A full block whose KV is computed gets a hash that
chains its parent's hash and its token ids; a later request with the same prefix reuses it.
Free blocks sit in an LRU queue; a free block keeps its hash (and stays reusable) until it
is handed out again. A prefix hit takes blocks out of the queue in O(1).
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

BlockHash = int


def hash_blocks(
    token_ids: Sequence[int], block_size: int, start_block: int, parent: BlockHash | None, salt: Hashable
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from `start_block` on, chained from `parent`.
    `salt` (the weights' generation, the request's cache salt) keeps caches apart."""
    hashes = []
    for first in range(start_block * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, salt, tuple(token_ids[first : first + block_size])))
        hashes.append(parent)
    return hashes


@dataclass
class PrefixHit:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, block_hashes: Sequence[BlockHash]) -> PrefixHit:
        """The longest cached prefix of `block_hashes`; nothing is taken yet."""
        blocks = []
        for block_hash in block_hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, len(blocks) * self.block_size)

    def take(self, blocks: Sequence[int]) -> None:
        """Hold cached blocks for one more request (a prefix hit)."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks, least recently freed first; raises if there are not enough."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget_hash(block)
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Release a request's blocks. Its tail goes first in the queue, so that shared
        prefixes stay cached the longest."""
        for block in reversed(blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def cache(self, blocks: Sequence[int], block_hashes: Sequence[BlockHash]) -> None:
        """Register computed full blocks under their hashes (first writer wins)."""
        for block, block_hash in zip(blocks, block_hashes):
            if self._hash_of[block] is None and block_hash not in self._cached:
                self._hash_of[block] = block_hash
                self._cached[block_hash] = block

    def forget_free_cached(self) -> int:
        """Drop the cached KV of every block no request holds; returns how many blocks that was."""
        dropped = [block for block in self._free if self._hash_of[block] is not None]
        for block in dropped:
            self._forget_hash(block)
        return len(dropped)

    def _forget_hash(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            self._hash_of[block] = None
            if self._cached.get(block_hash) == block:
                del self._cached[block_hash]
