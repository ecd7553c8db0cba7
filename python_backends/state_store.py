"""State that outlives a request (feedback claims, experiment counts, user records, the experiments served, the
shared secret), shared by every process of a server (router instances, the `feedback` model, the CLI) and, on
Redis, by every server that names the same Redis.

It lives behind one small interface, `StateStore`, shaped like Redis: each method is one Redis command (or one
MULTI/EXEC pipeline of them). It is Redis for several servers that share one state (tierserve.redis_store), SQLite
for one server (the default: one file that all its processes open, in WAL mode, so readers never wait for a writer;
writers queue for up to BUSY_TIMEOUT_S), or a dict for tests and a server run without a state file. As in Redis, a
key holds one kind of value (a string, a hash of counts, or a sorted set of members) and `delete` removes it
whatever its kind.

Where the store is: `$TIERSERVE_STATE` (STATE_ENV), set for tritonserver and its stubs by whoever launches it, else
a file under the user's state directory (`default_location()`).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

STATE_ENV = "TIERSERVE_STATE"  # "redis://host:port/db", "sqlite:///abs/path.db", an absolute path, or "memory:"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SECRET_KEY = "secret"
SECRET_BYTES = 32
BUSY_TIMEOUT_S = 5.0  # a writer waits this long for another process's transaction before giving up
PURGE_EVERY_S = 60.0  # expired strings are invisible at once and deleted by a write at most this often
_CHUNK = 500  # keys or members per SQL statement (well under SQLite's limit on bound variables)

Clock = Callable[[], float]


class StateStoreError(RuntimeError):
    """The store cannot be opened or used; the message names the store and what to do."""


class StateStore(Protocol):
    """State that outlives a request, shared by a server's processes: one small Redis-shaped interface."""

    def get(self, key: str) -> bytes | None:
        """GET: the string under `key`, or None when there is none or it expired."""
        ...

    def set(self, key: str, value: bytes, *, ttl_s: float | None = None, only_if_absent: bool = False) -> bool:
        """SET [EX ttl_s] [NX]: True when written; False only when `only_if_absent` and a live value is there."""
        ...

    def delete(self, *keys: str) -> None:
        """DEL: remove the keys, whatever they hold."""
        ...

    def set_if_equal(self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None) -> bool:
        """SET key value [PX ttl] IFEQ expected (Redis 8.4; a script before): written only when the live string under
        `key` is `expected`, in one step, so a lease lapsed and taken by another is never overwritten."""
        ...

    def delete_if_equal(self, key: str, expected: bytes) -> bool:
        """DELEX key IFEQ expected (Redis 8.4; a script before): removed only when the live string is `expected`."""
        ...

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        """HINCRBYFLOAT key field amount for every key and field, all in one transaction (MULTI/EXEC)."""
        ...

    def counts(self, key: str) -> dict[str, float]:
        """HGETALL: the fields of the hash under `key` ({} when none)."""
        ...

    def counts_many(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        """HGETALL for each key (one pipeline); every key is in the answer, {} when it holds nothing."""
        ...

    def mark(self, key: str, members: Mapping[str, float]) -> None:
        """ZADD key score member ...: add the members, or update their score when present."""
        ...

    def members(self, key: str, *, limit: int | None = None) -> list[tuple[str, float]]:
        """ZRANGE key 0 limit-1 WITHSCORES: (member, score) by ascending score, ties by member."""
        ...

    def size(self, key: str) -> int:
        """ZCARD: how many members the sorted set under `key` has."""
        ...

    def unmark(self, key: str, members: Sequence[str]) -> None:
        """ZREM: remove the members (absent ones are ignored)."""
        ...

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


def default_location() -> str:
    """$TIERSERVE_STATE, else `tierserve/state.db` under $XDG_STATE_HOME (default ~/.local/state)."""
    if location := os.environ.get(STATE_ENV):
        return location
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "tierserve" / "state.db")


def open_store(location: str) -> StateStore:
    """The store at `location`: "redis://host:port/db" (also rediss:// and unix://; several servers can share it),
    "sqlite:///abs/path.db" or "/abs/path.db" (the processes of one server), or "memory:" (one process)."""
    if location == "memory:":
        return MemoryStore()
    if location.startswith(REDIS_SCHEMES):
        from tierserve.redis_store import RedisStore  # redis-py only where Redis is used

        return RedisStore(location)
    path = location.removeprefix("sqlite://")
    if "://" in path:
        raise StateStoreError(
            f"state store {location!r}: expected 'redis://host:port/db', 'sqlite:///abs/path.db', '/abs/path.db' "
            "or 'memory:'"
        )
    if not Path(path).expanduser().is_absolute():
        raise StateStoreError(
            f"state store {location!r}: the path must be absolute (the server's processes run in other directories)"
        )
    return SqliteStore(Path(path).expanduser())


def shared_secret(store: StateStore) -> bytes:
    """32 random bytes, created by the first process that asks and then the same for every process of the server,
    across restarts (the store keeps it): the key for REQUEST_ID tags and user hashes."""
    store.set(SECRET_KEY, os.urandom(SECRET_BYTES), only_if_absent=True)
    secret = store.get(SECRET_KEY)
    if secret is None or len(secret) != SECRET_BYTES:
        raise StateStoreError(
            f"the state store's {SECRET_KEY!r} is not {SECRET_BYTES} bytes; delete the key to renew it"
        )
    return secret


def finite_amount(key: str, field: str, amount: float) -> float:
    amount = float(amount)
    if not math.isfinite(amount):
        raise ValueError(f"add {key!r} {field!r}: amount must be finite, got {amount}")
    return amount


def positive_ttl(ttl_s: float | None) -> float | None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return ttl_s


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS strings (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS strings_expiring ON strings (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS counts (key TEXT, field TEXT, value REAL NOT NULL, PRIMARY KEY (key, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (key TEXT, member TEXT, score REAL NOT NULL, PRIMARY KEY (key, member)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS marks_by_score ON marks (key, score, member);
-- ZCARD in O(1), as in Redis: kept by mark/unmark/delete in the same transaction
CREATE TABLE IF NOT EXISTS mark_sizes (key TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
"""


# the row under :key holds :expected and has not expired at :now
_LIVE_AND_EQUAL = "key = :key AND value = :expected AND (expires IS NULL OR expires > :now)"


class SqliteStore:
    """The store in one SQLite file shared by the server's processes. Each thread of each process has its own
    connection (made on first use, and again after a fork); every write is one IMMEDIATE transaction, so
    concurrent read-modify-writes (HINCRBYFLOAT, SET NX) from several processes are serialised, never lost.
    The file is created owner-only (it holds the shared secret); WAL and its index inherit that mode."""

    def __init__(self, path: Path, *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._purged_at = float("-inf")
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._create(self._connection())
        except (OSError, sqlite3.Error) as error:
            raise StateStoreError(f"state store {self.path}: cannot be opened ({error})") from None

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    @staticmethod
    def _create(connection: sqlite3.Connection) -> None:
        """WAL mode and the schema. A server's stubs open a new file at the same moment, and switching to WAL can
        meet another connection's switch with SQLITE_BUSY at once, without the busy handler (measured: 2 of 40 starts
        of 8 processes failed "database is locked"): that is tried again for up to BUSY_TIMEOUT_S."""
        give_up_at = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
                return
            except sqlite3.OperationalError as error:
                if connection.in_transaction:
                    connection.rollback()
                if error.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() >= give_up_at:
                    raise
                time.sleep(0.01)

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # first use in this thread, or a forked child
            if self._closed:
                raise StateStoreError(f"state store {self.path} is closed")
            # autocommit (isolation_level=None): transactions are the explicit BEGIN IMMEDIATE of _write;
            # check_same_thread=False only so that close() can close every thread's connection
            local.connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            # NORMAL: a commit does not wait for fsync in WAL mode; power loss may lose the last commits, never
            # corrupt the file (these are counters and claims, not money)
            local.connection.execute("PRAGMA synchronous=NORMAL")
            local.pid = os.getpid()
            with self._lock:
                self._connections.append(local.connection)
        return local.connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        if connection.in_transaction:
            connection.execute("COMMIT")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            raise StateStoreError(f"state store {self.path}: {error}") from error

    def get(self, key: str) -> bytes | None:
        with self._errors():
            row = self._connection().execute("SELECT value, expires FROM strings WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        return bytes(row[0])

    def set(self, key: str, value: bytes, *, ttl_s: float | None = None, only_if_absent: bool = False) -> bool:
        now = self._clock()
        expires = None if positive_ttl(ttl_s) is None else now + ttl_s
        condition = "WHERE strings.expires IS NOT NULL AND strings.expires <= :now" if only_if_absent else ""
        with self._errors(), self._write() as connection:
            written = connection.execute(
                "INSERT INTO strings (key, value, expires) VALUES (:key, :value, :expires) ON CONFLICT (key) "
                f"DO UPDATE SET value = excluded.value, expires = excluded.expires {condition}",
                {"key": key, "value": bytes(value), "expires": expires, "now": now},
            ).rowcount
            if now - self._purged_at >= PURGE_EVERY_S:
                connection.execute("DELETE FROM strings WHERE expires IS NOT NULL AND expires <= ?", (now,))
                self._purged_at = now
        return written == 1

    def set_if_equal(self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None) -> bool:
        now = self._clock()
        expires = None if positive_ttl(ttl_s) is None else now + ttl_s
        with self._errors(), self._write() as connection:
            return (
                connection.execute(
                    f"UPDATE strings SET value = :value, expires = :expires WHERE {_LIVE_AND_EQUAL}",
                    {"key": key, "expected": bytes(expected), "value": bytes(value), "expires": expires, "now": now},
                ).rowcount
                == 1
            )

    def delete_if_equal(self, key: str, expected: bytes) -> bool:
        with self._errors(), self._write() as connection:
            return (
                connection.execute(
                    f"DELETE FROM strings WHERE {_LIVE_AND_EQUAL}",
                    {"key": key, "expected": bytes(expected), "now": self._clock()},
                ).rowcount
                == 1
            )

    def delete(self, *keys: str) -> None:
        with self._errors(), self._write() as connection:
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                for table in ("strings", "counts", "marks", "mark_sizes"):
                    connection.execute(f"DELETE FROM {table} WHERE key IN ({marks})", chunk)

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        rows = [
            (key, field, finite_amount(key, field, n)) for key, fields in counts.items() for field, n in fields.items()
        ]
        if not rows:
            return
        with self._errors(), self._write() as connection:
            connection.executemany(
                "INSERT INTO counts (key, field, value) VALUES (?, ?, ?) "
                "ON CONFLICT (key, field) DO UPDATE SET value = value + excluded.value",
                rows,
            )

    def counts(self, key: str) -> dict[str, float]:
        return self.counts_many([key])[key]

    def counts_many(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        found: dict[str, dict[str, float]] = {key: {} for key in keys}
        unique = list(found)
        with self._errors():
            connection = self._connection()
            for chunk in _chunks(unique):
                query = f"SELECT key, field, value FROM counts WHERE key IN ({','.join('?' * len(chunk))})"
                for key, field, value in connection.execute(query, chunk):
                    found[key][field] = value
        return found

    def mark(self, key: str, members: Mapping[str, float]) -> None:
        rows = [(key, member, float(score)) for member, score in members.items()]
        if not rows:
            return
        with self._errors(), self._write() as connection:
            present = 0
            for chunk in _chunks(list(members)):
                present += connection.execute(
                    f"SELECT COUNT(*) FROM marks WHERE key = ? AND member IN ({','.join('?' * len(chunk))})",
                    (key, *chunk),
                ).fetchone()[0]
            connection.executemany(
                "INSERT INTO marks (key, member, score) VALUES (?, ?, ?) "
                "ON CONFLICT (key, member) DO UPDATE SET score = excluded.score",
                rows,
            )
            self._resize(connection, key, len(rows) - present)

    def members(self, key: str, *, limit: int | None = None) -> list[tuple[str, float]]:
        with self._errors():
            rows = self._connection().execute(
                "SELECT member, score FROM marks WHERE key = ? ORDER BY score, member LIMIT ?",
                (key, -1 if limit is None else max(limit, 0)),
            )
            return [(member, score) for member, score in rows]

    def size(self, key: str) -> int:
        with self._errors():
            row = self._connection().execute("SELECT size FROM mark_sizes WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else row[0]

    def unmark(self, key: str, members: Sequence[str]) -> None:
        if not members:
            return
        with self._errors(), self._write() as connection:
            removed = 0
            for chunk in _chunks(list(dict.fromkeys(members))):
                removed += connection.execute(
                    f"DELETE FROM marks WHERE key = ? AND member IN ({','.join('?' * len(chunk))})", (key, *chunk)
                ).rowcount
            self._resize(connection, key, -removed)

    @staticmethod
    def _resize(connection: sqlite3.Connection, key: str, change: int) -> None:
        if change:
            connection.execute(
                "INSERT INTO mark_sizes (key, size) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET size = size + excluded.size",
                (key, change),
            )
            connection.execute("DELETE FROM mark_sizes WHERE key = ? AND size <= 0", (key,))

    def bytes_used(self) -> int:
        """Bytes the database's pages hold (the file less its free pages; the WAL not counted)."""
        with self._errors():
            connection = self._connection()
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            free = connection.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * page_size

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()


class MemoryStore:
    """The store in this process's memory, with SqliteStore's semantics: for tests, and for a server run without a
    state file (each process then has its own, so feedback reaches only what its own process issued)."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._strings: dict[str, tuple[bytes, float | None]] = {}
        self._counts: dict[str, dict[str, float]] = {}
        self._marks: dict[str, dict[str, float]] = {}
        self._purged_at = float("-inf")

    def _live(self, key: str, now: float) -> bytes | None:
        value, expires = self._strings.get(key, (None, None))
        if expires is not None and expires <= now:
            del self._strings[key]
            return None
        return value

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._live(key, self._clock())

    def set(self, key: str, value: bytes, *, ttl_s: float | None = None, only_if_absent: bool = False) -> bool:
        now = self._clock()
        expires = None if positive_ttl(ttl_s) is None else now + ttl_s
        with self._lock:
            if only_if_absent and self._live(key, now) is not None:
                return False
            self._strings[key] = (bytes(value), expires)
            if now - self._purged_at >= PURGE_EVERY_S:
                self._strings = {k: v for k, v in self._strings.items() if v[1] is None or v[1] > now}
                self._purged_at = now
            return True

    def set_if_equal(self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None) -> bool:
        now = self._clock()
        expires = None if positive_ttl(ttl_s) is None else now + ttl_s
        with self._lock:
            if self._live(key, now) != expected:
                return False
            self._strings[key] = (bytes(value), expires)
            return True

    def delete_if_equal(self, key: str, expected: bytes) -> bool:
        with self._lock:
            if self._live(key, self._clock()) != expected:
                return False
            del self._strings[key]
            return True

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                for table in (self._strings, self._counts, self._marks):
                    table.pop(key, None)

    def add(self, counts: Mapping[str, Mapping[str, float]]) -> None:
        amounts = [
            (key, field, finite_amount(key, field, n)) for key, fields in counts.items() for field, n in fields.items()
        ]
        with self._lock:
            for key, field, amount in amounts:
                fields = self._counts.setdefault(key, {})
                fields[field] = fields.get(field, 0.0) + amount

    def counts(self, key: str) -> dict[str, float]:
        with self._lock:
            return dict(self._counts.get(key, {}))

    def counts_many(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        with self._lock:
            return {key: dict(self._counts.get(key, {})) for key in keys}

    def mark(self, key: str, members: Mapping[str, float]) -> None:
        if members:
            with self._lock:
                self._marks.setdefault(key, {}).update({m: float(s) for m, s in members.items()})

    def members(self, key: str, *, limit: int | None = None) -> list[tuple[str, float]]:
        with self._lock:
            ordered = sorted(self._marks.get(key, {}).items(), key=lambda item: (item[1], item[0]))
        return ordered if limit is None else ordered[: max(limit, 0)]

    def size(self, key: str) -> int:
        with self._lock:
            return len(self._marks.get(key, {}))

    def unmark(self, key: str, members: Sequence[str]) -> None:
        with self._lock:
            scores = self._marks.get(key, {})
            for member in members:
                scores.pop(member, None)
            if not scores:
                self._marks.pop(key, None)

    def close(self) -> None:
        """Nothing to release."""
