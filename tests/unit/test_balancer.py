"""The nginx configuration for several replicas: nginx itself accepts it, and it retries only what is safe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierserve.tools.balancer import NGINX, BalancerSettings, Nginx, Replica, main, nginx_config

REPLICAS = [Replica(name="a", http_port=8000, grpc_port=8001), Replica(name="b", http_port=9000, grpc_port=9001)]
SETTINGS = BalancerSettings(http_port=7000, grpc_port=7001)


def _location(config: str, start: str) -> str:
    """The block of the location that starts with `start`."""
    block = config[config.index(start) :]
    return block[: block.index("}")]


def test_inference_is_retried_once_sent_and_feedback_only_when_it_reached_no_replica(tmp_path: Path):
    config = nginx_config(REPLICAS, SETTINGS, tmp_path)
    assert "server 127.0.0.1:8000 max_fails=1 fail_timeout=2s;  # a" in config
    assert "server 127.0.0.1:9001 max_fails=1 fail_timeout=2s;  # b" in config
    inference = _location(config, "location ~ ^/v2/models/[^/]+")
    assert "proxy_next_upstream error timeout http_502 non_idempotent;" in inference
    feedback = _location(config, "location ~ ^/v2/models/feedback")
    assert "proxy_next_upstream error timeout;" in feedback and "non_idempotent" not in feedback
    assert "return 403" in _location(config, "location ~ ^/v2/(repository|")


def test_a_replica_taken_out_by_hand_is_marked_down(tmp_path: Path):
    config = nginx_config([REPLICAS[0], REPLICAS[1].model_copy(update={"down": True})], SETTINGS, tmp_path)
    assert "server 127.0.0.1:9000 max_fails=1 fail_timeout=2s down;  # b" in config


def test_no_replicas_or_the_same_name_twice_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="at least one replica"):
        nginx_config([], SETTINGS, tmp_path)
    with pytest.raises(ValueError, match="names must differ"):
        nginx_config([REPLICAS[0], REPLICAS[0]], SETTINGS, tmp_path)


@pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed (tools/bootstrap.sh installs it)")
def test_nginx_accepts_the_configuration(tmp_path: Path):
    Nginx(REPLICAS, SETTINGS, tmp_path / "ok").check()


def test_the_command_line_prints_the_configuration_or_names_a_bad_replica(tmp_path: Path, capsys):
    replicas = ["--replica", "a=10.0.0.1:8000:8001", "--replica", "b=10.0.0.2:8000:8001"]
    assert main([*replicas, "--prefix", str(tmp_path)]) == 0
    assert "server 10.0.0.2:8001 max_fails=1 fail_timeout=2s;  # b" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--replica", "a=10.0.0.1:8000", "--prefix", str(tmp_path)])
    assert "expected NAME=HOST:HTTP_PORT:GRPC_PORT, got 'a=10.0.0.1:8000'" in capsys.readouterr().err
