"""P4 resilience: kill -9 the digits_light stub under steady load and follow traffic per route over time.

Usage: .venv/bin/python perf/bench_chaos.py [--plot perf/reports/p4_timeline.png]   (about 30 s)

Two client threads (critical and standard) send one image per request back to back. At 5 s the shared
light model's Python stub is killed; the router must answer every request, eject the model, reload it,
and move standard traffic back (critical rows run on their reserved lane throughout). Prints the
goals' numbers and writes a timeline plot (requests/s per route, errors).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
from harness import running_server

from tierserve.tools.dataset import load_split
from tierserve.tools.load import Sent, SteadyLoad

KILL_AT_S, RUN_S, BUCKET_S = 5.0, 20.0, 0.5
MODEL = "digits_light:1"


def _on_model(sent: Sent) -> bool:
    return sent.answer is not None and sent.answer.path.split(">")[0] in (f"{MODEL} ok", f"{MODEL} low_confidence")


def summarize(sent: list[Sent], start: float, killed: float) -> dict[str, float]:
    """The goals' numbers: failed critical requests, failures before the ejection, seconds until traffic is back.

    Critical rows run on their reserved lane (digits_light_critical), which the kill does not touch;
    the standard tier shares digits_light, so the recovery is read from its rows."""
    after = sorted((s for s in sent if s.at > killed and s.tier == "standard"), key=lambda s: s.at)
    first_ejected = next((s.at for s in after if s.answer and f"{MODEL} ejected" in s.answer.path), None)
    failed_before = sum(1 for s in after if s.answer and (first_ejected is None or s.at <= first_ejected)
                        and (f"{MODEL} error" in s.answer.path or f"{MODEL} timeout" in s.answer.path))
    back = None
    for i in range(len(after) - 10):
        if first_ejected and after[i].at > first_ejected and all(_on_model(s) for s in after[i:i + 10]):
            back = after[i].at
            break
    return {
        "requests": len(sent),
        "failed_critical": sum(1 for s in sent if s.error and s.tier == "critical"),
        "critical_rows_off_their_lane_after_the_kill": sum(
            1 for s in sent if s.at > killed and s.tier == "critical" and s.answer
            and not s.answer.path.startswith("digits_light_critical:1 ")),
        "failed_any": sum(1 for s in sent if s.error),
        "rows_failed_on_model_before_ejection": failed_before,
        "seconds_to_ejection": (first_ejected - killed) if first_ejected else float("nan"),
        "seconds_until_traffic_back": (back - killed) if back else float("nan"),
    }


def plot(sent: list[Sent], start: float, killed: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.arange(0, RUN_S + BUCKET_S, BUCKET_S)
    routes = sorted({s.answer.route for s in sent if s.answer})
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for route in routes:
        times = [s.at - start for s in sent if s.answer and s.answer.route == route and _direct(s)]
        label = f"answered by {route}, no failure on the way"
        ax.plot(edges[:-1], np.histogram(times, edges)[0] / BUCKET_S, label=label)
    fallback = [s.at - start for s in sent if s.answer and not _direct(s)]
    ax.plot(edges[:-1], np.histogram(fallback, edges)[0] / BUCKET_S, label="answered via fallback / ejection")
    errors = [s.at - start for s in sent if s.error]
    ax.plot(edges[:-1], np.histogram(errors, edges)[0] / BUCKET_S, label="failed requests", color="black",
            linestyle=":", linewidth=2)
    ax.axvline(killed - start, color="gray", linestyle="--", label=f"kill -9 {MODEL} stub")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests / s")
    ax.set_title("P4: digits under steady load (critical + standard) while digits_light's stub is killed")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _direct(sent: Sent) -> bool:
    return not any(f" {outcome}" in sent.answer.path for outcome in ("error", "timeout", "ejected"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", type=Path, default=Path("perf/reports/p4_timeline.png"))
    args = parser.parse_args()
    images = load_split().test.images[:100]
    with running_server() as server:
        (pid,) = server.stub_pids("digits_light")
        with SteadyLoad(server.grpc_url, images) as load:
            start = time.monotonic()
            time.sleep(KILL_AT_S)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            time.sleep(RUN_S - KILL_AT_S)
    numbers = summarize(load.sent, start, killed)
    print("| measure | value |\n|---|---:|")
    for name, value in numbers.items():
        print(f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |")
    paths = Counter(s.answer.path for s in load.sent if s.answer and killed < s.at < killed + 3)
    print("\npaths in the 3 s after the kill:", dict(paths.most_common(4)))
    plot(load.sent, start, killed, args.plot)
    print(f"\ntimeline: {args.plot}")


if __name__ == "__main__":
    main()
