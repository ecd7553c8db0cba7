"""The embedded tritonserver is found, and its backend directory and environment are assembled right."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from tierserve.tools.server import Ports
from tierserve.tools.triton_install import assemble_backend_directory, embedded_install, server_environment


def test_the_embedded_install_has_a_stub_for_this_python():
    install = embedded_install()
    assert install.tritonserver.name == "tritonserver" and os.access(install.tritonserver, os.X_OK)
    assert install.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_backend_directory_links_the_python_backend_and_the_stub(tmp_path: Path):
    install = embedded_install()
    backends = assemble_backend_directory(install, tmp_path)
    python_dir = backends / "python"
    names = {p.name for p in python_dir.iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"} <= names
    assert all(p.is_symlink() for p in python_dir.iterdir())
    assert (python_dir / "triton_python_backend_stub").resolve() == install.stub.resolve()
    assemble_backend_directory(install, tmp_path)  # again over an existing directory: still fine
    assert {p.name for p in python_dir.iterdir()} == names


def test_environment_puts_this_interpreter_first():
    env = server_environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "PYTHONPATH": "/elsewhere"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [sysconfig.get_config_var("LIBDIR"), "/opt/lib"]
    assert "PYTHONPATH" not in env


def test_free_ports_are_distinct_and_not_busy():
    ports = Ports.free()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3
    assert ports.busy() == []
