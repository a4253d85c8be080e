"""CURVE keys of a session: the control plane between hosts admits only the session's processes.

In: keys made by the driver (``SessionKeys.new``), handed to each process at launch inside its
spec. Out: sockets set up as CURVE servers that admit only the session's client key, or as
clients of the session's servers.
Invariants: every socket that listens on TCP is a CURVE server with a ZAP handler on its
context (``admit_only``) that refuses any other client key, and logs the refusal; every TCP
connection is a CURVE client. A process without the session's keys cannot send or read a frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import zmq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionKeys:
    """The session's two CURVE key pairs (z85): servers use one, clients the other."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def new(cls) -> SessionKeys:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support; install pyzmq's wheel "
                               "(pip install --force-reinstall pyzmq), which bundles it")
        return cls(*zmq.curve_keypair(), *zmq.curve_keypair())

    def as_tuple(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.server_public, self.server_secret, self.client_public, self.client_secret)

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (set before bind)."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the session's servers (set before connect)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


class _OnlySession:
    """ZAP credentials check: the session's client key (z85), nothing else."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.public:
            return True
        logger.error("refused a CURVE client whose key is not this session's (%s...)",
                     bytes(key[:8]).decode(errors="replace"))
        return False


def admit_only(ctx: zmq.Context, keys: SessionKeys) -> Any:
    """Start a ZAP handler on ``ctx`` that admits only ``keys``' client key; returns it (stop it
    before the context is destroyed)."""
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("headrace.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OnlySession(keys.client_public))
    return auth
