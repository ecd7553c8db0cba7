"""The canary of digits_heavy:3 (the torch CNN) end to end, as the README shows it: a server of its own, 32 users
sending clean and noisy images and feedback (the true label), and `tierserve canary digits_heavy:3` judged on errors,
latency and accuracy from feedback. Shadow agreement is off: a better candidate disagrees where the baseline is
wrong (with it on, the same canary was rolled back at 10%: 85.4% agreement on this workload).

    .venv/bin/python perf/demo_canary.py
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tierserve.client import TierserveClient
from tierserve.tools.dataset import load_split
from tierserve.tools.paths import DEFAULT_REPOSITORY
from tierserve.tools.server import Ports, TritonServer
from tierserve.tools.workload import noisy

USERS = 32
CANARY = ["--steps", "10,50,100", "--step-s", "15", "--max-step-s", "120", "--min-rows", "60", "--min-calls", "20"]
CANARY += ["--min-feedback", "60", "--min-shadow-agreement", "off", "--poll-s", "1"]


def main() -> None:
    split = load_split()
    images = np.concatenate([split.test.images[:180], noisy(split.test.images[180:360], sigma=3.0, seed=1)])
    labels = split.test.labels[:360]
    stop, counts, errors = threading.Event(), Counter(), Counter()

    def user(url: str, index: int) -> None:
        rng = np.random.default_rng(index)
        with TierserveClient(url) as client:
            while not stop.is_set():
                k = int(rng.integers(len(images)))
                try:
                    (answer,) = client.classify(images[k], user_id=f"user-{index}", deadline_ms=3000)
                    counts["sent"] += 1
                    client.feedback(answer.request_id, int(labels[k]))
                    counts["feedback"] += 1
                except Exception as error:
                    errors[str(error)[:80]] += 1
                time.sleep(0.01)

    workdir = Path(tempfile.mkdtemp())
    with (
        (workdir / "tritonserver.log").open("wb") as log,
        TritonServer(DEFAULT_REPOSITORY, Ports.free(), workdir, output=log) as server,
    ):
        server.wait_ready()
        env = {
            **os.environ,
            "TIERSERVE_ADMIN_KEY": server.admin_key,
            "TIERSERVE_STATE": server.state,
            "TIERSERVE_AUDIT": str(workdir / "audit.jsonl"),
            "COLUMNS": "110",
        }
        users = [threading.Thread(target=user, args=(server.grpc_url, i)) for i in range(USERS)]
        for thread in users:
            thread.start()
        time.sleep(2)
        print("$ tierserve canary digits_heavy:3 " + " ".join(CANARY))
        where = ["--url", server.http_url, "--metrics-url", server.metrics_url]
        command = [".venv/bin/tierserve", "canary", "digits_heavy:3", *where, *CANARY]
        canary = subprocess.run(command, env=env, capture_output=True, text=True)
        print(canary.stdout, canary.stderr[-3000:], f"exit {canary.returncode}", sep="\n")
        stop.set()
        for thread in users:
            thread.join()
        print(dict(counts), "errors:", dict(errors))
        audit = subprocess.run([".venv/bin/tierserve", "audit"], env=env, capture_output=True, text=True)
        print(audit.stdout[-3000:])
        with TierserveClient(server.grpc_url) as client:
            print({a.route for a in client.classify(noisy(split.test.images[:40], sigma=4.0, seed=9))})


if __name__ == "__main__":
    main()
