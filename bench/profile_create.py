"""Where one create's time goes: one thread, no added latency, the stand-in in its own process.

    PYTHONPATH=. .venv/bin/python -m bench.profile_create [--contender ours-http] [--n 500] [--top 25]

Times N sequential creates (wall and this process's CPU per create, no profiler), then profiles another N
with cProfile and prints the functions with the most own time, the most cumulative time, and how often
each call asked requests/urllib3 for the things a lean path avoids (URL parses, header dict copies,
runtime-checkable Protocol checks, cookie extraction, hooks). Every record binds its customer by id, so
each create is one Dataverse request for every contender.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import workload
from bench.stand import RemoteStandIn

# (label, file suffix, function name): counted per create from the profile
WATCHED = (
    ("URL parses (urllib3 parse_url)", "urllib3/util/url.py", "parse_url"),
    ("URL splits (urllib.parse.urlsplit)", "urllib/parse.py", "urlsplit"),
    ("header dicts (CaseInsensitiveDict.__init__)", "requests/structures.py", "__init__"),
    ("Protocol isinstance checks (typing _ProtocolMeta.__instancecheck__)", "typing.py", "__instancecheck__"),
    ("cookie extraction (extract_cookies_to_jar)", "requests/cookies.py", "extract_cookies_to_jar"),
    ("cookie header merge (get_cookie_header)", "requests/cookies.py", "get_cookie_header"),
    ("hooks (dispatch_hook)", "requests/hooks.py", "dispatch_hook"),
    ("requests prepare (PreparedRequest.prepare)", "requests/models.py", "prepare"),
    ("requests send (Session.send)", "requests/sessions.py", "send"),
    ("environment merge (merge_environment_settings)", "requests/sessions.py", "merge_environment_settings"),
)


def contender(name: str, info: dict[str, Any]) -> tuple[workload.Call, Any]:
    if name == "ours-http":
        from shared import instance

        os.environ["PYTHON_THREADPOOL_THREAD_COUNT"] = "1"
        instance.reset()
        return workload.ours_http(), None
    if name == "sdk":
        return workload.sdk(info)
    if name == "raw":
        return workload.raw(info, 1, workload.fetch_token(info))
    raise SystemExit(f"unknown contender {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_create", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", default="ours-http", choices=("ours-http", "sdk", "raw"))
    p.add_argument("--n", type=int, default=500, help="creates timed, and as many profiled")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--own", action="store_true", help="also list the app's own functions (shared/, triggers/)")
    p.add_argument("--callers", action="append", default=[], metavar="PATTERN",
                   help="also print who called the functions matching PATTERN (pstats), e.g. urlparse")
    a = p.parse_args(argv)
    with RemoteStandIn(0.0, 0.0, 0.0) as stand:
        info = stand.info
        os.environ.update(info["env"])
        mix = workload.Mix(keyed=0.5, by_id=1.0)
        recs = workload.records(3 * a.n + 20, "profile", mix, info["seed_contact_id"], info["seed_account_id"])
        call, handle = contender(a.contender, info)
        for rec in recs[:20]:  # token, secret, connection, metadata: all before the clock
            if err := call(rec):
                raise SystemExit(f"warm-up failed: {err}")
        timed, profiled = recs[20:20 + a.n], recs[20 + a.n:20 + 2 * a.n]
        walls, cpus = [], []  # per chunk of 50 creates: the median and the least are steadier than a total
        for start in range(0, len(timed), 50):
            cpu0, t0 = time.process_time(), time.perf_counter()
            for rec in timed[start:start + 50]:
                call(rec)
            walls.append((time.perf_counter() - t0) / len(timed[start:start + 50]))
            cpus.append((time.process_time() - cpu0) / len(timed[start:start + 50]))
        prof = cProfile.Profile()
        prof.enable()
        for rec in profiled:
            call(rec)
        prof.disable()
        if handle is not None:
            handle.close()
    print(f"{a.contender}: {a.n} creates, one thread, 0 ms added latency, without the profiler: per create "
          f"{statistics.median(walls) * 1000:.3f} ms wall (least {min(walls) * 1000:.3f}) and "
          f"{statistics.median(cpus) * 1000:.3f} ms CPU in this process (least {min(cpus) * 1000:.3f}); "
          "medians and least of chunks of 50")
    stats = pstats.Stats(prof)
    print("\nper create:")
    for label, suffix, fn in WATCHED:
        calls = sum(v[1] for k, v in stats.stats.items() if k[0].endswith(suffix) and k[2] == fn)  # type: ignore[attr-defined]
        print(f"  {calls / a.n:6.1f}  {label}")
    for order in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(order).print_stats(a.top)
        text = out.getvalue()
        print(f"\n== by {order} ==")
        print(text[text.find("   ncalls"):].rstrip())
    if a.own:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(r"/(shared|triggers)/", 40)
        text = out.getvalue()
        own = sum(v[2] for k, v in stats.stats.items() if "/shared/" in k[0] or "/triggers/" in k[0])  # type: ignore[attr-defined]
        print(f"\n== the app's own functions: {own / a.n * 1000:.3f} ms own time per create (profiled) ==")
        print(text[text.find("   ncalls"):].rstrip())
    for pattern in a.callers:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().print_callers(pattern)
        text = out.getvalue()
        print(f"\n== callers of {pattern} ==\n" + text[text.find("was called by"):].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
