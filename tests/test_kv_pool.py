"""The KV pool's choice of rows: prefix reuse first, then rows that keep a decoder run compact."""

from __future__ import annotations

import numpy as np

from edgevl.runtime.kv_pool import KVPool


def _pool(rows: int = 8) -> KVPool:
    return KVPool(n_layers=1, n_kv_heads=1, head_dim=8, rows=rows, max_len=256, budget_bytes=1 << 20)


def _turn(pool: KVPool, keys: np.ndarray) -> int:
    row, _ = pool.acquire(keys, keys.size + 8)
    pool.advance(row, keys)
    return row


def test_newcomers_take_rows_next_to_the_running_ones():
    """The load bench's second round: the first round's rows (1-4) and a warm-up's (0) hold cached
    turns, 5-7 are empty. Four new conversations must run as one block of four rows, not on 0, 5, 6, 7
    (a decoder run over rows 0..7, four of them idle rows running a dummy token over their cache)."""
    pool = _pool()
    warm = _turn(pool, np.arange(100, 140))
    pool.release(warm)
    first = [_turn(pool, np.arange(1000 * (i + 1), 1000 * (i + 1) + 50)) for i in range(4)]
    for r in first:
        pool.release(r)
    second = [_turn(pool, np.arange(5000 * (i + 1), 5000 * (i + 1) + 50)) for i in range(4)]
    assert max(second) - min(second) == 3, (warm, first, second)


def test_a_conversation_still_gets_its_own_row_back():
    pool = _pool()
    a = _turn(pool, np.arange(10, 60))
    b = _turn(pool, np.arange(500, 560))
    pool.release(a)
    row, reused = pool.acquire(np.arange(10, 80), 90)  # a's next turn: its prompt starts with a's
    assert (row, reused) == (a, 50), (row, reused, b)
