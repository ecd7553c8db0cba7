"""Where the project keeps its model repository and local runtime state."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
RUNTIME_DIR = PROJECT_ROOT / ".tierserve"  # assembled backend directory, git-ignored
ADMIN_KEY_ENV = "TIERSERVE_ADMIN_KEY"  # the operator's key for load/unload; else `tierserve serve` makes one
ADMIN_KEY_FILE = RUNTIME_DIR / "admin_key"  # where `tierserve serve` writes the key it made
