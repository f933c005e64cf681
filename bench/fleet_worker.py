"""One instance of the fleet: its own process and its own `function_app` import, consuming the shared
`cases` queue (and, with --followups, the `followups` queue) in Azurite with the host's queue semantics
(devstack/queuehost.py), until the queues stay empty.

    python -m bench.fleet_worker --seconds 120 --queue-budget 2.0   (settings from the environment)
Prints one JSON line: what the host side saw.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--idle", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threshold", type=int, default=4)
    p.add_argument("--visibility", type=float, default=2.0)
    p.add_argument("--queue-budget", type=float, default=60.0)
    p.add_argument("--followups", action="store_true", help="drain the followups queue too")
    a = p.parse_args()
    import function_app  # noqa: F401 - the instance's own import, as the host does
    from devstack.queuehost import QueueHost
    from shared import batching, instance
    from triggers import followups_queue, queue_intake

    scale = a.queue_budget / queue_intake.QUEUE_BUDGET
    queue_intake.QUEUE_BUDGET = a.queue_budget  # the per-call budget, scaled with the clock
    batching.MIN_LEFT *= scale  # and the least time a create must have left to join a $batch
    fn = queue_intake.cases_queue.build().get_user_function()
    host = QueueHost(os.environ["AzureWebJobsStorage"], "cases", fn, batch_size=a.batch,
                     new_batch_threshold=a.threshold, visibility_timeout=a.visibility)
    follow = QueueHost(os.environ["AzureWebJobsStorage"], "followups",
                       followups_queue.followups_queue.build().get_user_function(), batch_size=a.batch,
                       new_batch_threshold=a.threshold, visibility_timeout=a.visibility) if a.followups else None
    started = time.monotonic()
    side = threading.Thread(target=lambda: follow.run(idle_seconds=a.idle, max_seconds=a.seconds,
                                                      threads=a.batch + a.threshold)) if follow else None
    if side:
        side.start()
    stats = host.run(idle_seconds=a.idle, max_seconds=a.seconds, threads=a.batch + a.threshold)
    if side:
        side.join(timeout=a.seconds)
    gate = instance.intake().client.gate
    print(json.dumps({"succeeded": stats.succeeded, "host_retries": stats.failed_attempts,
                      "rejected": stats.rejected, "poisoned_by_host": stats.poisoned, "errors": stats.errors[:5],
                      "seconds": round(time.monotonic() - started, 2), "gate_limit": gate.limit,
                      "gate_waits": gate.waits,
                      **({"followups_succeeded": follow.stats.succeeded, "followups_host_retries":
                          follow.stats.failed_attempts, "followups_rejected": follow.stats.rejected,
                          "followups_errors": follow.stats.errors[:5]} if follow else {})}), flush=True)


if __name__ == "__main__":
    main()
