"""REQUEST_ID: what the router answered for one row, signed, so that feedback on it can be trusted and learned from.

An id is verifiable by itself: base64url (no padding) of a packed payload and a 16-byte HMAC-SHA256 tag over it,
keyed from the server's shared secret (`state_store.shared_secret`). Issuing writes no state; a client can read the
payload (it holds no user id, only its keyed hash) but cannot alter it or make one up. Payload, big-endian:

    version u8 | seed u64 | issued_at u48 (unix ms) | tier u8 (index in TIERS) | label u8 |
    first_label u8 (255: none) | user length u8 (0 or 8) | user (8 bytes: the 16 hex digits of user_key) |
    arms (UTF-8 "experiment=arm,experiment2=arm2", to the end)

With a user and two arms of 30 characters an id is 100 characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tierserve.signature import TIERS

RETENTION_S = 7 * 24 * 3600  # feedback is taken for this long after an answer
VERSION = 1
TAG_BYTES = 16
NO_LABEL = 255
USER_BYTES = 8  # user_key's 16 hex digits
SHOWN_CHARS = 40  # of a refused id, in messages
_HEAD = struct.Struct(">BQ6sBBBB")
_ID = re.compile(r"[A-Za-z0-9_-]+")
_MAX_ID_CHARS = 1024  # longer is not one of ours: refused before decoding
_TIER_INDEX = {tier: index for index, tier in enumerate(TIERS)}


class RequestIdError(ValueError):
    """A REQUEST_ID that cannot be taken; the message says why and what to send instead."""


class UnknownRequestId(RequestIdError):
    """Not an id this server issued: malformed, altered, or signed with another secret."""


class ExpiredRequestId(RequestIdError):
    """An id this server issued, older than the retention."""


@dataclass(frozen=True)
class IssuedRow:
    """What the router answered for one row, carried inside its REQUEST_ID."""

    seed: int  # the row's 64-bit random seed (unique per row; also seeds its randomized decisions)
    issued_at: float  # unix seconds (kept to the millisecond)
    user: str  # keyed hash of the user id (user_key), "" without one
    tier: str
    label: int  # the label answered
    first_label: int | None  # the cascade's first model's label when it answered the row, else None
    arms: tuple[tuple[str, str], ...]  # (experiment, arm); shadow experiments as (name, experiment_spec.MIRRORED)


def new_seeds(n: int) -> list[int]:
    """`n` random 64-bit seeds from the OS."""
    return list(struct.unpack(f"<{n}Q", os.urandom(8 * n)))


def user_key(secret: bytes, user_id: str) -> str:
    """A user's keyed hash: HMAC-SHA256(secret, "user:" + user_id), 16 hex digits; "" for no user. The prefix keeps
    user hashes, which clients can read in their ids, apart from every other use of the secret."""
    if not user_id:
        return ""
    return hmac.digest(secret, b"user:" + user_id.encode(), "sha256")[:USER_BYTES].hex()


def shown_id(request_id: str) -> str:
    """An id as messages echo it: at most SHOWN_CHARS characters, quoted."""
    return repr(request_id if len(request_id) <= SHOWN_CHARS else request_id[:SHOWN_CHARS] + "...")


def _unknown(request_id: object) -> UnknownRequestId:
    shown = shown_id(request_id) if isinstance(request_id, str) else f"of type {type(request_id).__name__}"
    return UnknownRequestId(
        f"unknown REQUEST_ID {shown}: not issued by this server (wrong format or signature); "
        "send the REQUEST_ID of a digits answer unchanged"
    )


class RequestIds:
    """Issues and reads REQUEST_IDs under one secret (every process of a server shares it)."""

    def __init__(self, secret: bytes, retention_s: float = RETENTION_S) -> None:
        key = hmac.digest(secret, b"request-id", "sha256")  # not the secret itself: see user_key
        # HMAC-SHA256 (RFC 2104) with the padded key's hash states made once: half the cost of hmac.digest per id
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key.ljust(64, b"\0")))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key.ljust(64, b"\0")))
        self.retention_s = retention_s
        self._arms: dict[tuple[tuple[str, str], ...], bytes] = {}  # few distinct arm sets: encode each once

    def _tag(self, payload: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:TAG_BYTES]

    def issue(self, rows: Sequence[IssuedRow]) -> list[str]:
        """One id per row. ValueError for a row that cannot be packed (unknown tier, label outside 0-254, a user
        that is not a user_key, an arm name with ',' or '=')."""
        return [self._issue(row) for row in rows]

    def _issue(self, row: IssuedRow) -> str:
        try:
            tier = _TIER_INDEX[row.tier]
            user = bytes.fromhex(row.user)
            head = _HEAD.pack(
                VERSION,
                row.seed,
                round(row.issued_at * 1000).to_bytes(6, "big"),
                tier,
                row.label,
                NO_LABEL if row.first_label is None else row.first_label,
                len(user),
            )
        except (KeyError, ValueError, struct.error, OverflowError) as error:
            raise ValueError(f"cannot issue a REQUEST_ID for {row}: {error!r}") from None
        if len(user) not in (0, USER_BYTES) or NO_LABEL in (row.label, row.first_label):
            raise ValueError(f"cannot issue a REQUEST_ID for {row}: the user must be a user_key, labels 0-254")
        payload = head + user + self._arms_bytes(row.arms)
        return base64.urlsafe_b64encode(payload + self._tag(payload)).rstrip(b"=").decode()

    def _arms_bytes(self, arms: tuple[tuple[str, str], ...]) -> bytes:
        if (packed := self._arms.get(arms)) is None:
            if any(sep in name for pair in arms for name in pair for sep in ",=") or any(not e for e, _ in arms):
                raise ValueError(f"cannot issue a REQUEST_ID for arms {arms}: names must be non-empty, without , or =")
            packed = ",".join(f"{experiment}={arm}" for experiment, arm in arms).encode()
            if len(self._arms) < 4096:  # bounded: arm sets come from the experiments file
                self._arms[arms] = packed
        return packed

    def read(self, request_id: str, now: float) -> IssuedRow:
        """The row an id was issued for. UnknownRequestId when it was not issued here (or was altered);
        ExpiredRequestId when it is older than the retention."""
        if not isinstance(request_id, str) or len(request_id) > _MAX_ID_CHARS or not _ID.fullmatch(request_id):
            raise _unknown(request_id)
        try:
            raw = base64.urlsafe_b64decode(request_id + "=" * (-len(request_id) % 4))
        except binascii.Error:  # a length no encoding has
            raise _unknown(request_id) from None
        payload, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        if len(payload) < _HEAD.size or not hmac.compare_digest(self._tag(payload), tag):
            raise _unknown(request_id)
        version, seed, millis, tier, label, first_label, user_bytes = _HEAD.unpack_from(payload)
        user_end = _HEAD.size + user_bytes
        try:
            if version != VERSION or tier >= len(TIERS) or user_bytes not in (0, USER_BYTES):
                raise ValueError(version)
            arms_text = payload[user_end:].decode()
            arms = tuple(tuple(pair.split("=", 1)) for pair in arms_text.split(",")) if arms_text else ()
        except ValueError:  # signed by us, but not in a layout this version reads
            raise _unknown(request_id) from None
        issued_at = int.from_bytes(millis, "big") / 1000
        if (age := now - issued_at) > self.retention_s:
            raise ExpiredRequestId(
                f"expired REQUEST_ID {shown_id(request_id)}: issued {age / 86400:.1f} days ago; feedback is taken "
                f"for {self.retention_s / 86400:g} days after an answer"
            )
        return IssuedRow(
            seed=seed,
            issued_at=issued_at,
            user=payload[_HEAD.size : user_end].hex(),
            tier=TIERS[tier],
            label=label,
            first_label=None if first_label == NO_LABEL else first_label,
            arms=arms,  # type: ignore[arg-type]  # pairs: split("=", 1) of text that has "=" in every pair
        )
