"""`tierserve serve` runs tritonserver in the foreground and leaves nothing behind when stopped."""

from __future__ import annotations

import fcntl
import ipaddress
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tierserve.tools.repository_variants import policy_variant, shipped_policy
from tierserve.tools.server import SHM_DIR, Ports, ServerError, TritonServer


def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine outside 127/8 (SIOCGIFADDR on each interface), None when it has none."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                request = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(request[20:24])
            if not ipaddress.IPv4Address(address).is_loopback:
                return address
    return None


def _accepts(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) == 0


def _processes_with(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(text)
    return found


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def launch_serve(
    model_repository: Path, ports: Ports, env: dict[str, str] | None = None, sigint_ignored: bool = False
) -> subprocess.Popen[str]:
    """`tierserve serve` on `ports` in a process of its own, its output piped (text); with `sigint_ignored`, started
    as a shell starts a background job: SIGINT ignored."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tierserve.tools.cli",
            "serve",
            "--no-build",
            f"--model-repository={model_repository}",
            f"--http-port={ports.http}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )


@pytest.mark.parametrize(
    ("stop_signal", "sigint_ignored"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigint-to-a-background-job", "sigterm"],
)
def test_serve_prints_where_it_listens_and_stops_cleanly(
    model_repository: Path, stop_signal: signal.Signals, sigint_ignored: bool
):
    """A background job of a shell without job control (a script's `tierserve serve &`, a CI step) starts with SIGINT
    ignored; serve stops on it all the same, as tritonserver does."""
    ports = Ports.free()
    launcher = launch_serve(model_repository, ports, sigint_ignored=sigint_ignored)
    try:
        banner = []
        deadline = time.monotonic() + 120
        assert launcher.stdout is not None
        for line in launcher.stdout:
            banner.append(line)
            if "Press Ctrl-C to stop." in line or time.monotonic() > deadline:
                break
        text = "".join(banner)
        assert f"http://127.0.0.1:{ports.http}" in text and f"127.0.0.1:{ports.grpc}" in text
        assert f"http://127.0.0.1:{ports.metrics}/metrics" in text
        for port in (ports.http, ports.grpc, ports.metrics):  # what /proc says tritonserver listens on
            assert f"bound to 127.0.0.1:{port}" in text
        assert "every interface" not in text
        assert "tierserve-admin-key" in text and "triton-grpc-protocol-tierserve-admin-key" in text
        assert "digits_heavy:1" in text and "digits_heavy:2" in text and "digits_rules:1" in text
        if (outside := _non_loopback_ipv4()) is not None:
            for port in (ports.http, ports.grpc, ports.metrics):
                assert not _accepts(outside, port), f"{outside}:{port} must not accept connections"
            assert _accepts("127.0.0.1", ports.http)

        shm_prefix = f"tierserve_{launcher.pid}_{ports.http}_"
        assert _processes_with(shm_prefix), "the Python stubs run with the launcher's shared-memory prefix"
        launcher.send_signal(stop_signal)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:  # a failed check leaves no server running (its tritonserver gets SIGTERM)
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0
    assert _processes_with(shm_prefix) == []
    assert list(SHM_DIR.glob(f"{shm_prefix}*")) == []
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", ports.http)) != 0, "nothing listens on the HTTP port any more"


def test_the_default_address_is_loopback_only_and_every_interface_must_be_asked_for(tmp_path: Path):
    """With an empty repository (fast): the default server refuses connections on a non-loopback address of this
    machine, and one started with address 0.0.0.0 accepts them there (so the check can tell the two apart)."""
    outside = _non_loopback_ipv4()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    (tmp_path / "repository").mkdir()
    for address, reachable in (("127.0.0.1", False), ("0.0.0.0", True)):
        ports = Ports.free()
        with (
            (tmp_path / f"{address}.log").open("wb") as log,
            TritonServer(tmp_path / "repository", ports, tmp_path / address, output=log, address=address) as server,
        ):
            server.wait_ready(timeout_s=60)
            # gRPC listens on an IPv6 socket: [::ffff:127.0.0.1], or [::] (IPv6 too) for every interface
            grpc = [address] if address == "127.0.0.1" else ["::"]
            assert server.listening() == dict(
                sorted({ports.http: [address], ports.grpc: grpc, ports.metrics: [address]}.items())
            )
            for port in (ports.http, ports.grpc, ports.metrics):
                assert _accepts(outside, port) is reachable, f"{address}: {outside}:{port}"
                assert _accepts("127.0.0.1", port)


def test_a_stopped_server_leaves_no_process_and_no_shared_memory(model_repository: Path, tmp_path: Path):
    with (tmp_path / "log").open("wb") as log:
        server = TritonServer(model_repository, Ports.free(), tmp_path, output=log)
        with server:
            server.wait_ready()
            assert len(server.live_processes()) > 1, "tritonserver and its stubs are running"
            reload_log = Path(tempfile.gettempdir()) / f"tierserve-{server.live_processes()[0]}"
            assert reload_log.is_dir(), "the routers share a reload log"
        assert server.live_processes() == []
        assert server.swept_shm_regions == [], "tritonserver released its shared memory itself"
        assert not reload_log.exists()


def test_busy_ports_are_reported_before_starting(model_repository: Path, tmp_path: Path, triton: TritonServer):
    server = TritonServer(model_repository, triton.ports, tmp_path)
    with pytest.raises(
        ServerError,
        match=f"port\\(s\\) {triton.ports.http}, {triton.ports.grpc}, {triton.ports.metrics} already in use",
    ):
        server.start()


def test_a_broken_repository_fails_fast_with_the_exit_code(tmp_path: Path):
    (tmp_path / "repo" / "broken").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: -')
    with (tmp_path / "log").open("wb") as log:
        server = TritonServer(tmp_path / "repo", Ports.free(), tmp_path, output=log)
        with server, pytest.raises(ServerError, match="exited with code 1 before it was ready"):
            server.wait_ready(timeout_s=60)
    assert "broken" in (tmp_path / "log").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fallback": "digits_heavy:1"}, "fallback: 'digits_heavy:1' is not listed under models"),
        ({"cascade": {"first": "digits_light:2"}}, "cascade.escalate_to: required key is missing"),
        ({"fallback": "digits_light:2"}, "fallback digits_light:2 must accept images with missing pixels"),
    ],
)
def test_a_bad_policy_fails_the_router_load_naming_the_key(
    model_repository: Path, tmp_path: Path, change: dict, message: str
):
    repository = tmp_path / "repository"
    repository.mkdir()
    policy_variant(model_repository, repository, {**shipped_policy(model_repository), **change})
    with (tmp_path / "log").open("wb") as log:
        server = TritonServer(repository, Ports.free(), tmp_path, output=log)
        with server, pytest.raises(ServerError, match="before it was ready"):
            server.wait_ready(timeout_s=120)
    assert message in (tmp_path / "log").read_text()
