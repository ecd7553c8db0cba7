"""Where the project keeps its model repository and local runtime state."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
RUNTIME_DIR = PROJECT_ROOT / ".tierserve"  # assembled backend directory, keys, git-ignored
ADMIN_KEY_ENV = "TIERSERVE_ADMIN_KEY"  # the operator's key for the admin APIs; else `tierserve serve` makes one
ADMIN_KEY_FILE = RUNTIME_DIR / "admin_key"  # where `tierserve serve` writes the key it made (mode 600)
# The tier keys file when $TIERSERVE_TIER_KEYS names none; `tierserve serve` creates it on first start with one
# key for `critical`, whose plain text it writes to TIER_KEY_FILE (both mode 600).
TIER_KEYS_FILE = RUNTIME_DIR / "tier_keys.json"
TIER_KEY_FILE = RUNTIME_DIR / "tier_key"
# State that outlives a request (experiments, bandit posteriors, feedback, per-user records) when $TIERSERVE_STATE
# names no other: `tierserve serve` gives it to the server, `tierserve experiment` reads it.
STATE_FILE = RUNTIME_DIR / "state.db"
# The inference log of `tierserve serve` ($TIERSERVE_LOG_DIR names another; tools/server.py: WORKDIR/inference_log)
LOG_DIR = RUNTIME_DIR / "inference_log"
# The append-only log of operator actions (load, unload, fault, experiment, canary, promote, rollback, retire) when
# $TIERSERVE_AUDIT names no other; created mode 600, one JSON object a line; `tierserve audit` prints it.
AUDIT_ENV = "TIERSERVE_AUDIT"
AUDIT_FILE = RUNTIME_DIR / "audit.jsonl"
