"""The tritonserver shipped in the nvidia-pytriton wheel, and the environment its Python backend needs.

Facts measured with Triton 2.51 from nvidia-pytriton 0.7.0:
- a backend directory of symlinks to the wheel's python backend plus the stub for our Python version
  works without extra library paths (copies would need nvidia_pytriton.libs on LD_LIBRARY_PATH);
- the stub imports packages through the first `python3` on PATH, not PYTHONPATH, so the virtual
  environment's bin goes first;
- the stub links libpython3.X.so, so the running interpreter's LIBDIR goes first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


class TritonNotFound(RuntimeError):
    """No usable tritonserver installation."""


@dataclass(frozen=True)
class TritonInstall:
    """The pieces of a tritonserver installation that a launch needs."""

    tritonserver: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python version


def embedded_install() -> TritonInstall:
    """The tritonserver inside the installed nvidia-pytriton wheel, with the stub for this Python."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound(
            "nvidia-pytriton is not installed in this environment: run `make serve`, which installs it into .venv"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        tritonserver=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / python_version / "triton_python_backend_stub",
    )
    for path in (install.tritonserver, install.python_backend, install.stub):
        if not path.exists():
            raise TritonNotFound(f"{path} is missing from nvidia-pytriton (no stub for Python {python_version}?)")
    return install


def assemble_backend_directory(install: TritonInstall, target: Path) -> Path:
    """A --backend-directory holding `python/`: symlinks to the wheel's backend files and the stub."""
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [*install.python_backend.iterdir(), install.stub]:
        if source.name == "__pycache__":
            continue
        link = python_dir / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver: this interpreter's bin first on PATH, its LIBDIR on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env.pop("PYTHONPATH", None)  # the stub ignores it; the venv's site-packages is the one source of code
    return env
