"""Cold start: what importing `function_app` costs, and what the first invocation after import does.

`python -m bench.coldstart --first-call` is the child side: import the app, call `create_case` once
against the stand-in named by the environment, print the timings as JSON. Nothing heavy is imported
before the clock starts.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

REPO_ENV = "BENCH_REPO"
CASE_ENV = "BENCH_FIRST_CASE"


def _first_call() -> None:
    t0 = time.perf_counter()
    import function_app  # noqa: F401  (the import under test)

    t1 = time.perf_counter()
    import os
    import types
    import uuid

    import azure.functions as func

    from triggers import http_intake

    fn = http_intake.create_case.build().get_user_function()
    req = func.HttpRequest(method="POST", url="http://localhost/api/cases",
                           headers={"Content-Type": "application/json"}, body=os.environ[CASE_ENV].encode())
    ctx = types.SimpleNamespace(invocation_id=str(uuid.uuid4()), function_name="create_case")
    t2 = time.perf_counter()
    resp = fn(req, ctx)
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "call_s": t3 - t2, "status": resp.status_code}))


# ---- the parent side ------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def _run_timed(subprocess: Any, argv: list[str], cwd: str, env: dict[str, str], limit: float = 60.0) -> None:
    """Run a child to its end, waiting without a timeout: `subprocess.run(timeout=...)` polls the child
    with sleeps of up to 50 ms, which made every import figure a multiple of ~50 ms. A timer kills a child
    still running after `limit` seconds."""
    import threading

    proc = subprocess.Popen(argv, cwd=cwd, env=env)
    timer = threading.Timer(limit, proc.kill)
    timer.start()
    try:
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        raise subprocess.CalledProcessError(code, argv)


def import_times(python: str, repo: str, runs: int = 7) -> dict[str, Any]:
    """Median wall time of three fresh interpreters, and what importing the app adds over its two libraries."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": repo}
    for name in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "OTEL_EXPORTER_OTLP_ENDPOINT", "INTAKE_TELEMETRY_CONSOLE"):
        env.pop(name, None)
    # With telemetry on: the Azure Monitor distro configured at import (the endpoint is never reached here).
    telemetry_env = {**env, "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
                     "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                                                              "IngestionEndpoint=https://127.0.0.1:9/"}
    commands = {"interpreter": "pass", "libraries": "import azure.functions, requests",
                "function_app": "import function_app", "function_app_telemetry": "import function_app"}
    times: dict[str, list[float]] = {k: [] for k in commands}
    for round_ in range(runs + 1):  # round 0 warms the page cache and the .pyc files; not counted
        names = list(commands)
        names = names[round_ % 4:] + names[:round_ % 4]  # rotate the order so drift hits all alike
        for name in names:
            t = time.perf_counter()
            _run_timed(subprocess, [python, "-c", commands[name]], repo,
                       telemetry_env if name == "function_app_telemetry" else env)
            if round_:
                times[name].append(time.perf_counter() - t)
    med = {k: _median(v) for k, v in times.items()}
    libs = med["libraries"] - med["interpreter"]
    app = med["function_app"] - med["interpreter"]
    telemetry = med["function_app_telemetry"] - med["interpreter"]
    return {"runs": runs, "median_s": med, "samples_s": times, "libraries_import_s": libs, "app_import_s": app,
            "app_over_libraries": app / libs - 1 if libs > 0 else None, "app_import_telemetry_s": telemetry}


def first_invocations(python: str, repo: str, env: dict[str, str], case: dict, stand: Any,
                      runs: int = 3) -> dict[str, Any]:
    """`runs` fresh processes: import, then one create_case; the stand-in counts what each sent."""
    import os
    import subprocess

    from bench.stand import service_counts

    results = []
    for _ in range(runs):
        stand.reset()
        child_env = {**os.environ, **env, "PYTHONPATH": repo, CASE_ENV: json.dumps(case)}
        t = time.perf_counter()
        proc = subprocess.run([python, "-m", "bench.coldstart", "--first-call"], cwd=repo, env=child_env,
                              capture_output=True, text=True, timeout=120, check=False)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"first-call child failed: {proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["process_wall_s"] = wall
        out["outbound"] = service_counts(stand.snapshot())
        results.append(out)
    return {"runs": runs, "import_s": _median([r["import_s"] for r in results]),
            "call_s": _median([r["call_s"] for r in results]), "status": [r["status"] for r in results],
            "outbound": results[0]["outbound"], "samples": results}


if __name__ == "__main__":
    if "--first-call" in sys.argv:
        _first_call()
    else:
        import os

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(import_times(sys.executable, root), indent=2))
