"""How tritonserver is launched to close its admin surface, bind one address and forward tier keys, and the key
files `tierserve serve` makes: checked without starting a server."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from tierserve.tier_keys import TierKeyError, TierKeys
from tierserve.tools import serve
from tierserve.tools.server import (
    GRPC_ADMIN_HEADER,
    Ports,
    TritonServer,
    _proc_net_address,
    admin_headers,
    cmdline_hidden_from_other_users,
    connect_host,
)


def _server(tmp_path: Path, **options: object) -> TritonServer:
    return TritonServer(
        tmp_path / "repository",
        Ports(8000, 8001, 8002),
        tmp_path / "work",
        admin_key="k",
        tritonserver=Path("/opt/tritonserver/bin/tritonserver"),
        **options,
    )


def test_every_state_changing_api_needs_the_admin_key_over_both_protocols(tmp_path: Path):
    command = _server(tmp_path).command()
    apis = "model-repository,logging,trace,shared-memory"
    assert f"--http-restricted-api={apis}:tierserve-admin-key=k" in command
    assert f"--grpc-restricted-protocol={apis}:tierserve-admin-key=k" in command
    assert admin_headers("http", "k") == {"tierserve-admin-key": "k"}
    assert admin_headers("grpc", "k") == {GRPC_ADMIN_HEADER: "k"} == {"triton-grpc-protocol-tierserve-admin-key": "k"}


def test_the_server_binds_loopback_unless_told_otherwise(tmp_path: Path):
    default = _server(tmp_path)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(
        default.command()
    )
    assert (default.http_url, default.grpc_url) == ("127.0.0.1:8000", "127.0.0.1:8001")
    everywhere = _server(tmp_path, address="0.0.0.0")
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(
        everywhere.command()
    )
    assert everywhere.metrics_url == "http://127.0.0.1:8002/metrics", "clients on this machine use loopback"
    assert connect_host("192.0.2.7") == "192.0.2.7"
    with pytest.raises(ValueError):
        _server(tmp_path, address="::")


def test_the_tier_key_and_parameter_headers_are_forwarded_into_request_parameters_never_the_admin_key(
    tmp_path: Path,
):
    command = _server(tmp_path).command()
    (http,) = [a.split("=", 1)[1] for a in command if a.startswith("--http-header-forward-pattern=")]
    (grpc,) = [a.split("=", 1)[1] for a in command if a.startswith("--grpc-header-forward-pattern=")]
    assert http == grpc
    forwarded = re.compile(http, re.IGNORECASE)  # Triton matches headers in any case
    for header in ("tierserve-tier-key", "tierserve-param-tier", "TierServe-Param-Deadline-Ms"):
        assert forwarded.fullmatch(header), header
    for header in ("tierserve-admin-key", "tierserve-param-", "authorization", "tierserve-tier-key-x"):
        assert not forwarded.fullmatch(header), header


def test_a_server_without_an_operators_keys_file_makes_its_own_key(tmp_path: Path):
    own = _server(tmp_path)
    assert own.tier_key is not None and own.tier_keys == tmp_path / "work" / "tier_keys.json"
    operator = _server(tmp_path, tier_keys=tmp_path / "operator.json")
    assert operator.tier_key is None and operator.tier_keys == tmp_path / "operator.json"


@pytest.mark.parametrize(
    ("options", "hidden"),
    [
        ("rw,nosuid,nodev,noexec,relatime", False),
        ("rw,relatime,hidepid=0", False),
        ("rw,relatime,hidepid=off", False),
        ("rw,relatime,hidepid=2", True),
        ("rw,relatime,hidepid=invisible", True),
        ("rw,relatime,hidepid=1", True),
    ],
)
def test_hidepid_on_proc_is_recognised(tmp_path: Path, options: str, hidden: bool):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"sysfs /sys sysfs rw 0 0\nproc /proc proc {options} 0 0\n")
    assert cmdline_hidden_from_other_users(mounts) is hidden


def test_proc_net_addresses_are_decoded():
    assert _proc_net_address("0100007F:1F40") == ("127.0.0.1", 8000)
    assert _proc_net_address("00000000:1F41") == ("0.0.0.0", 8001)
    assert _proc_net_address("0000000000000000FFFF00000100007F:1F42") == ("127.0.0.1", 8002)  # IPv4-mapped
    assert _proc_net_address("00000000000000000000000000000000:1F42") == ("::", 8002)


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`tierserve serve`'s key files under tmp_path instead of the project's .tierserve."""
    runtime = tmp_path / ".tierserve"
    for name, path in {
        "RUNTIME_DIR": runtime,
        "ADMIN_KEY_FILE": runtime / "admin_key",
        "TIER_KEYS_FILE": runtime / "tier_keys.json",
        "TIER_KEY_FILE": runtime / "tier_key",
    }.items():
        monkeypatch.setattr(serve, name, path)
    monkeypatch.delenv("TIERSERVE_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TIERSERVE_TIER_KEYS", raising=False)
    return runtime


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_serve_writes_the_admin_key_private(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch):
    key = serve._admin_key()
    assert (runtime_dir / "admin_key").read_text() == key and _mode(runtime_dir / "admin_key") == 0o600
    assert _mode(runtime_dir) == 0o700
    monkeypatch.setenv("TIERSERVE_ADMIN_KEY", "operator's")
    assert serve._admin_key() == "operator's"


def test_the_first_start_makes_a_local_critical_key_and_later_starts_keep_it(runtime_dir: Path):
    path = serve._tier_keys(None)
    assert path == runtime_dir / "tier_keys.json"
    key = (runtime_dir / "tier_key").read_text().strip()
    assert _mode(path) == 0o600 and _mode(runtime_dir / "tier_key") == 0o600
    assert TierKeys.load(path).verdict("critical", key).key_name == "local"
    stored = path.read_text()
    assert serve._tier_keys(None) == path and path.read_text() == stored
    assert (runtime_dir / "tier_key").read_text().strip() == key


def test_an_operators_keys_file_is_used_as_it_is(runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    operator = tmp_path / "operator.json"
    with pytest.raises(TierKeyError, match="cannot be read"):
        serve._tier_keys(operator)
    TierKeys().add("alice", "alice-key", "critical").save(operator)
    assert serve._tier_keys(operator) == operator
    monkeypatch.setenv("TIERSERVE_TIER_KEYS", str(operator))
    assert serve._tier_keys(None) == operator
    assert not (runtime_dir / "tier_key").exists(), "no local key next to an operator's file"
