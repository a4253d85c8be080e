"""The doorbell: one wait for whichever of several channels gets a value (or closes) first."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time

import pytest

from headrace.channels.doorbell import Doorbell
from headrace.channels.shm import ShmChannel
from headrace.channels.socket import SocketChannel
from headrace.exceptions import ChannelClosedError, WouldBlock

from . import peers

SPAWN = mp.get_context("spawn")
KINDS = {"shm": lambda bell: ShmChannel(1, 4, 1024, ring=bell),
         "socket": lambda bell: SocketChannel(1, 4, ring=bell)}


@pytest.fixture(params=sorted(KINDS))
def pair(request):
    bell = Doorbell()
    chans = [KINDS[request.param](bell) for _ in range(2)]
    yield bell, chans
    for ch in chans:
        ch.close()
    bell.close()


def test_a_write_in_another_process_to_either_channel_wakes_one_wait(pair) -> None:
    bell, (a, b) = pair
    readers = [a.reader(0), b.reader(0)]
    child = SPAWN.Process(target=peers.write_later, args=(b.writer(), "from b", 0.5))
    child.start()
    try:
        seen = bell.seen()
        for reader in readers:
            with pytest.raises(WouldBlock):
                reader.read_nowait()
        start = time.monotonic()
        assert bell.wait(seen, 20 * 10**9)
        assert time.monotonic() - start < 10     # woke for the value, not at the deadline
        value = None
        for _ in range(100):    # a socket value may trail its ring by a moment
            try:
                value = readers[1].read_nowait()
                break
            except WouldBlock:
                time.sleep(0.01)
        assert value == "from b"
        with pytest.raises(WouldBlock):
            readers[0].read_nowait()
    finally:
        child.join(10)
    assert child.exitcode == 0


def test_a_wait_times_out_when_nothing_rings_and_a_close_wakes_it(pair) -> None:
    bell, (a, _) = pair
    seen = bell.seen()
    start = time.monotonic()
    assert not bell.wait(seen, 200_000_000)
    assert time.monotonic() - start >= 0.19
    seen = bell.seen()
    timer = threading.Timer(0.3, a.close)
    timer.start()
    start = time.monotonic()
    assert bell.wait(seen, 20 * 10**9)
    assert time.monotonic() - start < 10
    with pytest.raises(ChannelClosedError):
        a.reader(0).read(timeout_s=5)


def test_a_closed_bell_never_blocks_and_a_gone_one_is_never_rung() -> None:
    bell = Doorbell()
    copy = pickle.loads(pickle.dumps(bell))
    seen = bell.seen()
    copy.ring()
    assert bell.seen() != seen and bell.wait(seen, 10**9)
    bell.close()
    start = time.monotonic()
    assert bell.wait(bell.seen(), 10 * 10**9)       # closed: returns at once
    assert time.monotonic() - start < 1
    gone = pickle.loads(pickle.dumps(bell))         # its segment was unlinked
    assert gone.name is None
    gone.ring()                                     # a no-op
