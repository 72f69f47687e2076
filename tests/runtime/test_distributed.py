"""The attempt handshake of lmtools.runtime.distributed on a real TCPStore: the ranks of an attempt agree
on one name, whatever order they start in and whatever an earlier attempt left in the store."""

import random
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtools.runtime.distributed import agree_on_attempt


@pytest.fixture(scope="module")
def server():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    return store


def client(server) -> dist.Store:
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))


def attempt(server, prefix: str, world_size: int, delays: list[float]) -> dict:
    """One attempt: each rank starts after its delay, on its own connection; returns rank -> the
    name it got."""
    names, errors = {}, []

    def rank(r):
        try:
            time.sleep(delays[r])
            names[r] = agree_on_attempt(dist.PrefixStore(prefix, client(server)), r, world_size, timeout=20)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return names


@settings(max_examples=15, deadline=None)
@given(
    world_size=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    attempts=st.integers(2, 4),
)
def test_every_rank_of_every_attempt_agrees_on_a_new_name(server, world_size, seed, attempts):
    rng = random.Random(seed)
    prefix = f"job{seed}-{world_size}-{attempts}"
    seen = set()
    for _ in range(attempts):
        # Any order: rank 0 first, last or in between, so stale hellos are there or not.
        names = attempt(server, prefix, world_size, [rng.uniform(0, 0.05) for _ in range(world_size)])
        assert len(names) == world_size and len(set(names.values())) == 1
        name = names[0]
        assert name not in seen  # never an earlier attempt's keys
        seen.add(name)


def test_an_attempt_whose_rank_died_before_answering_leaves_nothing_the_next_one_reads(server):
    """A rank of the first attempt wrote its hello and died before rank 0 came; the next attempt
    with the same ranks still agrees (rank 0 deletes the old hellos before it reads any)."""
    store = dist.PrefixStore("died", client(server))
    store.set("lmtools/attempt-handshake/hello/1", "a-dead-workers-nonce")
    store.set("lmtools/attempt-handshake/hello/2", "another-dead-nonce")
    names = attempt(server, "died", 3, [0.2, 0.0, 0.0])  # the live ranks start before rank 0
    assert len(set(names.values())) == 1 and len(names) == 3
