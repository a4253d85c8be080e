"""Compiled DAGs that span hosts (a Dask cluster, runtime/hosts): their socket channels.

In: a ``ChannelSpec`` of kind SOCKET while the runtime has a cluster. Out: a TCP channel
whose writer listens on its own host, signed with a fresh HMAC key that travels only inside the
endpoints (and those only over the CURVE control plane); for an output written on another host,
a relay in the driver that moves each value into a local shm channel, which rings the outputs'
doorbell as every local output does.
Invariants: the relay keeps order and passes every value once; a close or break of the socket
channel (teardown, a dead writer) reaches the local channel, with its reason.

  remote writer ═ tcp ═▶ driver: relay thread ─▶ [shm, 1 reader] ─bell─▶ the DAG's readers
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ... import _config
from ...compiler.plan import DRIVER
from ...exceptions import ChannelClosedError


def open_spanning(spec: Any, sync: str, bell: Any, cluster: Any, slot_bytes: int) -> Any:
    """The channel of ``spec`` between hosts: a TCP channel (channels/tcp.py) listening on its
    writer's host, with a relay for the driver's end when that writer is elsewhere (a writer
    here that must ring the outputs' doorbell gets the zmq socket channel, which rings it)."""
    host = spec.host or cluster.ip
    port = cluster.free_port(host)
    if not spec.host and bell is not None:
        from ...channels.socket import HMACAuth, SocketChannel
        return SocketChannel(len(spec.readers), spec.capacity, host=host, port=port,
                             auth=HMACAuth(os.urandom(32)), ring=bell)
    from ...channels.tcp import TcpChannel
    channel = TcpChannel(len(spec.readers), spec.capacity, host=host, port=port,
                         secret=os.urandom(32))
    if not spec.host or DRIVER not in spec.readers:
        return channel
    return Relayed(channel, spec.readers.index(DRIVER), spec.capacity, sync, bell, slot_bytes)


class Relayed:
    """A socket channel whose driver end is read through a local shm channel (see above)."""

    def __init__(self, channel: Any, index: int, capacity: int, sync: str, bell: Any,
                 slot_bytes: int) -> None:
        from ...channels.shm import ShmChannel
        self.channel, self.index = channel, index
        self.local = ShmChannel(1, capacity, slot_bytes, sync=sync, spin_us=_config.DAG_SPIN_US,
                                check_s=_config.WATCHED_CHECK_S, ring=bell)
        self._src, self._dst = channel.reader(index), self.local.writer()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="headrace-dag-relay")
        self._thread.start()

    @property
    def kind(self) -> str:
        return self.channel.kind

    def _run(self) -> None:
        while True:
            try:
                value = self._src.read(timeout_s=None)
            except ChannelClosedError as exc:
                self.local.mark_broken(str(exc))
                return
            try:
                self._dst.write(value, timeout_s=None)
            except ChannelClosedError:        # the driver closed it: the DAG is over
                return

    def writer(self) -> Any:
        return self.channel.writer()

    def reader(self, index: int = 0) -> Any:
        return self.local.reader(0) if index == self.index else self.channel.reader(index)

    def mark_broken(self, reason: str) -> None:
        self.channel.mark_broken(reason)
        self.local.mark_broken(reason)

    def close(self) -> None:
        self.channel.close()
        self.local.close()
        self._thread.join(1.0)

    def statistics(self) -> dict[str, Any]:
        return self.channel.statistics()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)
