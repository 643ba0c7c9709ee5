from core.block_pool import BlockPool, hash_blocks


def test_allocate_takes_lowest_free_blocks_in_order():
    pool = BlockPool(num_blocks=6, block_size=4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free == 3
    assert pool.allocate(2) == [3, 4]


def test_free_returns_tail_first_and_counts_refs():
    pool = BlockPool(num_blocks=4, block_size=4)
    blocks = pool.allocate(3)
    pool.take(blocks[:1])
    pool.free(blocks)
    assert pool.num_free == 3  # block 0 still held by the second owner
    assert pool.allocate(3) == [3, 2, 1]


def test_prefix_hit_reuses_cached_blocks_and_removes_them_from_free_list():
    pool = BlockPool(num_blocks=8, block_size=4)
    tokens = list(range(10))
    hashes = hash_blocks(tokens, 4, 0, None, salt=0)
    assert len(hashes) == 2
    blocks = pool.allocate(3)
    pool.cache(blocks[:2], hashes)
    pool.free(blocks)
    hit = pool.lookup(hashes)
    assert hit.blocks == [0, 1] and hit.num_tokens == 8
    pool.take(hit.blocks)
    assert pool.num_free == 6
    assert 0 not in pool.allocate(6) and pool.num_free == 0


def test_reallocated_block_loses_its_hash():
    pool = BlockPool(num_blocks=2, block_size=2)
    hashes = hash_blocks([1, 2], 2, 0, None, salt=0)
    block = pool.allocate(1)
    pool.cache(block, hashes)
    pool.free(block)
    pool.allocate(2)
    assert pool.lookup(hashes).blocks == []


def test_hashes_chain_and_depend_on_salt():
    a = hash_blocks([1, 2, 3, 4], 2, 0, None, salt=0)
    b = hash_blocks([9, 9, 3, 4], 2, 0, None, salt=0)
    c = hash_blocks([1, 2, 3, 4], 2, 0, None, salt=1)
    assert a[1] != b[1]  # same second block, different prefix
    assert a[0] != c[0]
    assert hash_blocks([1, 2, 3, 4], 2, 1, a[0], salt=0) == a[1:]
