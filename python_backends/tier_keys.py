"""Tier credentials: which keys may claim which service tier, from a file the operator manages, hashed at rest.

A tier at or below `standard` needs no key. Above it, a request must present a key whose `max_tier` allows
the tier; without one it is refused or, if the file says `on_missing: downgrade`, served as the highest tier
it may claim. The file (JSON, mode 600, written by `tierserve tier-key add/remove`):

    {"on_missing": "refuse", "keys": [{"name": "alice-app", "sha256": "<hex>", "max_tier": "critical"}]}

How the pieces meet (the names other code relies on):
- Clients send the key as the HTTP header or gRPC metadata `tierserve-tier-key` (TIER_KEY_HEADER; the SDK's
  `tier_key=`). tritonserver runs with `--http-header-forward-pattern` and `--grpc-header-forward-pattern`
  set to it, so Triton 2.51 adds it to the request's parameters as a string, named as the client spelled the
  header (HTTP keeps its case, gRPC metadata is lower case), after the body's own parameters; a client may
  also send it as a plain request parameter. `presented_key(parameters)` finds it whatever the case.
- tritonserver and its Python stubs get the keys file's path in the environment variable
  `TIERSERVE_TIER_KEYS` (TIER_KEYS_ENV), set by `tierserve.tools.server.TritonServer`.
- The router glue calls `TierKeys.load(path)` once and `verdict(tier, presented_key(parameters))` per request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from tierserve.operator_files import OperatorFileError, read_text
from tierserve.private_file import write_private
from tierserve.signature import TIERS

TIER_KEY_HEADER = "tierserve-tier-key"  # HTTP header / gRPC metadata key, and the request parameter it becomes
TIER_KEYS_ENV = "TIERSERVE_TIER_KEYS"  # the keys file's path, in tritonserver's and its stubs' environment
KEYLESS_TIER = "standard"  # this tier and the ones below it need no key
MAX_KEY_CHARS = 256  # a longer presented key is not one of ours; it is not even hashed
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TierKeyError(ValueError):
    """A keys file or a change to it is invalid (the message names the file and the dotted key), or a request
    carries its tier key in a form that cannot be judged."""


class OnMissing(Enum):
    """What happens to a request above `standard` without a key that allows its tier."""

    REFUSE = "refuse"
    DOWNGRADE = "downgrade"


class Grant(Enum):
    """How a requested tier was judged."""

    GRANTED = "granted"
    DOWNGRADED = "downgraded"
    REFUSED = "refused"


def _rank(tier: str) -> int:
    """0 for the most urgent tier."""
    return TIERS.index(tier)


def key_hash(key: str) -> str:
    """The SHA-256 (hex) under which a key is stored. Keys are 256 random bits, so no slow hash is needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe base64 (43 characters, valid as a header and gRPC metadata)."""
    return secrets.token_urlsafe(32)


def presented_key(parameters: Mapping[str, Any]) -> str | None:
    """The tier key among a request's parameters, whatever the case of its name; None when there is none.
    Several spellings with different values are refused (TierKeyError): no guessing which one counts."""
    values = {value for name, value in parameters.items() if str(name).lower() == TIER_KEY_HEADER}
    if len(values) > 1:
        raise TierKeyError(f"the request carries {len(values)} different {TIER_KEY_HEADER} values; send one")
    (value,) = values or {None}
    if value is not None and not isinstance(value, str):
        raise TierKeyError(f"{TIER_KEY_HEADER} must be a string")
    return value or None


@dataclass(frozen=True)
class TierKey:
    """One client's credential, as stored: never the key itself."""

    name: str  # who holds it, for operators and REASON (e.g. "alice-app")
    sha256: str  # hex SHA-256 of the key
    max_tier: str  # the most urgent tier this key may claim


@dataclass(frozen=True)
class TierVerdict:
    """What a request may do with the tier it asked for."""

    requested: str  # the tier the request asked for
    tier: str | None  # the tier to serve it at; None when refused
    grant: Grant
    key_name: str | None  # the key that allowed it, when one was needed and valid
    message: str  # for people: what was decided and, if anything is missing, what

    @property
    def refused(self) -> bool:
        return self.grant is Grant.REFUSED

    @property
    def downgraded(self) -> bool:
        return self.grant is Grant.DOWNGRADED


@dataclass(frozen=True)
class TierKeys:
    """The operator's tier keys and what happens to requests without a sufficient one."""

    keys: tuple[TierKey, ...] = ()
    on_missing: OnMissing = OnMissing.REFUSE
    source: str = field(default="<memory>", compare=False)  # where it was loaded from, for messages

    @classmethod
    def load(cls, path: Path) -> TierKeys:
        """Read and validate a keys file; TierKeyError names the file and the bad key."""
        try:
            data = json.loads(read_text(Path(path)))
        except OSError as error:
            raise TierKeyError(f"tier keys file {path}: cannot be read ({error.strerror})") from None
        except OperatorFileError as error:  # too large, or not UTF-8
            raise TierKeyError(f"tier keys file {path}: {error}") from None
        except ValueError as error:
            raise TierKeyError(f"tier keys file {path}: not valid JSON ({error})") from None
        except RecursionError:
            raise TierKeyError(f"tier keys file {path}: not valid JSON (nested too deeply)") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> TierKeys:
        def fail(problem: str) -> TierKeyError:
            return TierKeyError(f"tier keys file {source}: {problem}")

        if not isinstance(data, dict):
            raise fail("must be a JSON object with 'keys' and optionally 'on_missing'")
        if unknown := sorted(set(data) - {"keys", "on_missing"}):
            raise fail(f"unknown key {unknown[0]!r}; expected 'keys' and 'on_missing'")
        on_missing = data.get("on_missing", OnMissing.REFUSE.value)
        if on_missing not in {o.value for o in OnMissing}:
            raise fail(f"on_missing must be one of {', '.join(o.value for o in OnMissing)}, got {on_missing!r}")
        entries = data.get("keys", [])
        if not isinstance(entries, list):
            raise fail("keys must be a list")
        keys: list[TierKey] = []
        for i, entry in enumerate(entries):
            where = f"keys[{i}]"
            if not isinstance(entry, dict):
                raise fail(f"{where} must be an object with name, sha256 and max_tier")
            if missing := sorted({"name", "sha256", "max_tier"} - set(entry)):
                raise fail(f"{where}.{missing[0]}: required key is missing")
            if unknown := sorted(set(entry) - {"name", "sha256", "max_tier"}):
                raise fail(f"{where}: unknown key {unknown[0]!r}; expected name, sha256, max_tier")
            name, digest, max_tier = entry["name"], entry["sha256"], entry["max_tier"]
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise fail(
                    f"{where}.name must be 1-64 letters, digits or _.@- (starting with a letter or digit), got {name!r}"
                )
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise fail(f"{where}.sha256 must be 64 lower-case hex digits (the key's SHA-256), got {digest!r}")
            if max_tier not in TIERS:
                raise fail(f"{where}.max_tier must be one of {', '.join(TIERS)}, got {max_tier!r}")
            for j, earlier in enumerate(keys):
                if earlier.name == name:
                    raise fail(f"{where}.name {name!r} is already keys[{j}].name")
                if earlier.sha256 == digest:
                    raise fail(f"{where}.sha256 is already keys[{j}].sha256 ({earlier.name!r}): one key, one name")
            keys.append(TierKey(name, digest, max_tier))
        return cls(tuple(keys), OnMissing(on_missing), source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "on_missing": self.on_missing.value,
            "keys": [{"name": k.name, "sha256": k.sha256, "max_tier": k.max_tier} for k in self.keys],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: Path) -> None:
        """Write the keys file (mode 600 from creation, replaced atomically: a running router never reads half)."""
        write_private(Path(path), self.to_json())

    def add(self, name: str, key: str, max_tier: str) -> TierKeys:
        """These keys plus `key` under `name` (stored as its hash); TierKeyError if the name is taken or bad."""
        if not _NAME.fullmatch(name):
            raise TierKeyError(
                f"a tier key name must be 1-64 letters, digits or _.@- (starting with a letter or digit), got {name!r}"
            )
        if max_tier not in TIERS:
            raise TierKeyError(f"max_tier must be one of {', '.join(TIERS)}, got {max_tier!r}")
        if any(k.name == name for k in self.keys):
            raise TierKeyError(f"tier keys file {self.source}: a key is already called {name!r}; remove it first")
        return replace(self, keys=(*self.keys, TierKey(name, key_hash(key), max_tier)))

    def remove(self, name: str) -> TierKeys:
        """These keys without the one called `name`; TierKeyError if there is none."""
        kept = tuple(k for k in self.keys if k.name != name)
        if len(kept) == len(self.keys):
            raise TierKeyError(f"tier keys file {self.source}: no key is called {name!r}")
        return replace(self, keys=kept)

    def verdict(self, requested_tier: str, presented_key: str | None) -> TierVerdict:
        """Judge a request for `requested_tier` presenting `presented_key` (None or "" when it sent none)."""
        if requested_tier not in TIERS:
            raise ValueError(f"unknown tier {requested_tier!r}; tiers are {', '.join(TIERS)}")
        if _rank(requested_tier) >= _rank(KEYLESS_TIER):
            return TierVerdict(
                requested_tier, requested_tier, Grant.GRANTED, None, f"tier {requested_tier!r} needs no tier key"
            )
        needs = f"tier {requested_tier!r} needs a tier key (header {TIER_KEY_HEADER})"
        holder = self._holder(presented_key) if presented_key else None
        if holder is not None and _rank(holder.max_tier) <= _rank(requested_tier):
            return TierVerdict(
                requested_tier,
                requested_tier,
                Grant.GRANTED,
                holder.name,
                f"tier {requested_tier!r} granted to tier key {holder.name!r}",
            )
        if not presented_key:
            problem, fallback = f"{needs}; none was sent", KEYLESS_TIER
        elif holder is None:
            problem, fallback = f"{needs}; the key sent is not a known tier key", KEYLESS_TIER
        else:
            problem = f"{needs} allowing it; tier key {holder.name!r} allows at most {holder.max_tier!r}"
            fallback = TIERS[min(_rank(holder.max_tier), _rank(KEYLESS_TIER))]
        if self.on_missing is OnMissing.REFUSE:
            return TierVerdict(requested_tier, None, Grant.REFUSED, None, problem)
        return TierVerdict(
            requested_tier,
            fallback,
            Grant.DOWNGRADED,
            None if holder is None else holder.name,
            f"{problem}; served as {fallback!r}",
        )

    def _holder(self, presented_key: str) -> TierKey | None:
        """The stored key whose hash matches, comparing every hash in constant time (no early exit)."""
        if len(presented_key) > MAX_KEY_CHARS:
            return None
        digest = key_hash(presented_key)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


def read_key_file(path: Path) -> str | None:
    """A client's tier key: the one word in `path` (as `tierserve tier-key add` prints it), None when no such file."""
    if not path.exists():
        return None
    words = path.read_text().split()
    if len(words) != 1:
        raise TierKeyError(
            f"{path}: expected one tier key, as `tierserve tier-key add` prints it, got {len(words)} words"
        )
    return words[0]
