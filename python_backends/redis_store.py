"""The state store on Redis (`redis://host:port/db`, `rediss://...`, `unix:///path.sock?db=N`), for several servers
that share one state: each StateStore method is the Redis command it is named after, and `add` is one MULTI/EXEC
of HINCRBYFLOAT, so concurrent writers from every process of every server lose no increment.

Calls fail fast: a connection takes at most CONNECT_TIMEOUT_S and a reply COMMAND_TIMEOUT_S (the URL's
`socket_connect_timeout` and `socket_timeout` query options win), and a dropped connection is retried once at once
(a restarted Redis closes every pooled connection), never with a backoff. Every Redis failure is a StateStoreError
naming the store; what callers do then is theirs (tierserve.guarded_store keeps them out of a dead Redis's way).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tierserve.state_store import StateStoreError, finite_amount, positive_ttl

CONNECT_TIMEOUT_S = 0.05  # the kernel completes a connection even while Redis itself waits for a CPU
# a reply: 0.1 s timed out 122 times in 5 minutes of perf/bench_state.py on this 2-core machine at load average 6
# (Redis waited for a CPU); each spurious timeout freezes the router's state until the next probe (0.5 s)
COMMAND_TIMEOUT_S = 0.25
KEY_PREFIX = "tierserve:"  # every key this store writes, so a Redis database shared with other programs stays sane
# compare-and-set and compare-and-delete in one step (Redis 8.4's SET ... IFEQ and DELEX ... IFEQ, for any Redis):
# ARGV[1] is the expected value; SET_IF_EQUAL's ARGV[2] the new one, ARGV[3] its time to live in ms ('' for none)
SET_IF_EQUAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""
DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


def shown_location(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    """The store in a Redis database, shared by every process of every server that names it. redis-py's pool is
    thread-safe and makes new connections after a fork."""

    def __init__(self, url: str) -> None:
        self.location = shown_location(url)
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=COMMAND_TIMEOUT_S,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except ValueError as error:
            raise StateStoreError(f"state store {self.location}: {error}") from None
        self._set_if_equal = self._client.register_script(SET_IF_EQUAL)
        self._delete_if_equal = self._client.register_script(DELETE_IF_EQUAL)

    def __repr__(self) -> str:
        return f"RedisStore({self.location!r})"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as error:
            raise StateStoreError(f"state store {self.location}: {type(error).__name__}: {error}") from error

    def get(self, key: str) -> bytes | None:
        with self._errors():
            return self._client.get(KEY_PREFIX + key)

    def set(self, key: str, value: bytes, *, ttl_s: float | None = None, only_if_absent: bool = False) -> bool:
        expires_ms = None if positive_ttl(ttl_s) is None else max(math.ceil(ttl_s * 1000), 1)
        with self._errors():
            return bool(self._client.set(KEY_PREFIX + key, bytes(value), px=expires_ms, nx=only_if_absent))

    def set_if_equal(self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None) -> bool:
        expires_ms = "" if positive_ttl(ttl_s) is None else str(max(math.ceil(ttl_s * 1000), 1))
        with self._errors():
            return self._set_if_equal(keys=[KEY_PREFIX + key], args=[bytes(expected), bytes(value), expires_ms]) == 1

    def delete_if_equal(self, key: str, expected: bytes) -> bool:
        with self._errors():
            return self._delete_if_equal(keys=[KEY_PREFIX + key], args=[bytes(expected)]) == 1

    def delete(self, *keys: str) -> None:
        if keys:
            with self._errors():
                self._client.delete(*(KEY_PREFIX + key for key in keys))

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        amounts = [
            (key, field, finite_amount(key, field, n)) for key, fields in counts.items() for field, n in fields.items()
        ]
        if not amounts:
            return
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            for key, field, amount in amounts:
                pipe.hincrbyfloat(KEY_PREFIX + key, field, amount)
            pipe.execute()

    def counts(self, key: str) -> dict[str, float]:
        return self.counts_many([key])[key]

    def counts_many(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        unique = list(dict.fromkeys(keys))
        with self._errors(), self._client.pipeline(transaction=False) as pipe:
            for key in unique:
                pipe.hgetall(KEY_PREFIX + key)
            found = pipe.execute() if unique else []
        return {
            key: {field.decode(): float(value) for field, value in fields.items()}
            for key, fields in zip(unique, found, strict=True)
        }

    def mark(self, key: str, members: Mapping[str, float]) -> None:
        if members:
            with self._errors():
                self._client.zadd(KEY_PREFIX + key, {member: float(score) for member, score in members.items()})

    def members(self, key: str, *, limit: int | None = None) -> list[tuple[str, float]]:
        if limit is not None and limit <= 0:
            return []  # ZRANGE 0 -1 would be every member
        with self._errors():
            found = self._client.zrange(KEY_PREFIX + key, 0, -1 if limit is None else limit - 1, withscores=True)
        return [(member.decode(), score) for member, score in found]

    def size(self, key: str) -> int:
        with self._errors():
            return self._client.zcard(KEY_PREFIX + key)

    def unmark(self, key: str, members: Sequence[str]) -> None:
        if members:
            with self._errors():
                self._client.zrem(KEY_PREFIX + key, *members)

    def close(self) -> None:
        self._client.close()
