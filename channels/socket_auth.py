"""Authentication for the socket channel: the ``HMACAuth`` and ``CurveAuth`` settings a user passes,
the per-channel HMAC signer, the ZAP verdict that admits only the readers' CURVE key, and
``is_loopback``, which decides whether a channel may make its own HMAC secret (its endpoints then
carry it) or needs one from the user.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

import zmq


class HMACAuth:
    """A shared secret: every frame carries an HMAC-SHA256 of its content, keyed per channel."""

    __slots__ = ("secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"an HMAC secret must be bytes, not {type(secret).__name__}")
        if len(secret) < 16:
            raise ValueError(f"an HMAC secret must be at least 16 bytes, got {len(secret)}.\n\n"
                             "Use e.g. HMACAuth(os.urandom(32)) and give every process the same.")
        self.secret = bytes(secret)

    def __repr__(self) -> str:
        return "HMACAuth(<secret>)"


class CurveAuth:
    """CURVE keys (z85): the writer holds the server pair and admits only the client public key."""

    __slots__ = ("client_public", "client_secret", "server_public", "server_secret")

    def __init__(self, server_public: bytes, server_secret: bytes, client_public: bytes,
                 client_secret: bytes) -> None:
        keys = (server_public, server_secret, client_public, client_secret)
        if not all(isinstance(k, bytes) and len(k) == 40 for k in keys):
            raise ValueError("CURVE keys must be 40-byte z85 strings as zmq.curve_keypair() "
                             "makes them; or use CurveAuth.generate()")
        self.server_public, self.server_secret, self.client_public, self.client_secret = keys

    @classmethod
    def generate(cls) -> CurveAuth:
        """A fresh server keypair and client keypair."""
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE; use HMACAuth(secret) instead")
        return cls(*zmq.curve_keypair(), *zmq.curve_keypair())

    def __repr__(self) -> str:
        return (f"CurveAuth(server={self.server_public.decode()}, "
                f"client={self.client_public.decode()})")


class _Signer:
    __slots__ = ("key",)

    def __init__(self, secret: bytes, cid: bytes) -> None:
        self.key = hmac.digest(secret, b"headrace socket channel " + cid, "sha256")

    def sign(self, first: Any, payload: Any = None) -> bytes:
        if payload is None:
            return hmac.digest(self.key, first, "sha256")
        mac = hmac.new(self.key, first, hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def check(self, first: Any, payload: Any, mac: bytes) -> bool:
        return hmac.compare_digest(self.sign(first, payload), mac)


def _zap_reply(msg: list[bytes], client_key: bytes) -> tuple[bool, list[bytes]]:
    """Judge one ZAP request: admit only a CURVE peer holding ``client_key``; the reply to send."""
    ok = len(msg) >= 7 and msg[5] == b"CURVE" and hmac.compare_digest(msg[6], client_key)
    return ok, [b"1.0", msg[1] if len(msg) > 1 else b"", b"200" if ok else b"400",
                b"OK" if ok else b"unknown key", b"", b""]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
