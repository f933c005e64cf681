"""The intake benchmark: ours (HTTP and queue) against the raw floor, Microsoft's SDK and the naive client.

    PYTHONPATH=. .venv/bin/python -m bench.run [--n 2000] [--threads 16,32] [--latency-dataverse 0.02] ...

Writes .local/bench/latest.json and latest.md (untracked) and prints the table; --commit writes
bench/results/latest.* instead, the committed figures the README quotes. The stand-in runs in a child
process on the same 2 cores: its CPU time is reported per run, so a saturated stand-in shows. Contenders
alternate within each round, and every other round runs them in reverse order, so a drift in the machine's
load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import coldstart, workload
from bench.stand import RemoteStandIn, service_counts

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("raw", "sdk", "naive", "ours-http", "ours-queue")
WARM = 5  # sequential calls before each run; their outbound calls are reported as cold start
TARGETS = {"throughput": 0.95, "over_sdk": 1.10, "p99": 1.2, "tokens": 1, "vault_reads": 1, "dataverse": 1100,
           "import": 0.30}


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `xs` (seconds)."""
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def busy_cpu_s() -> float | None:
    """CPU seconds all processes on the machine have spent busy since boot (Linux), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_one(contender: str, threads: int, n: int, mix: workload.Mix, stand: RemoteStandIn,
            timeout: float) -> dict[str, Any]:
    from shared import instance

    info = stand.info
    tag = f"{contender}-{threads}-{uuid.uuid4().hex[:6]}"
    recs = workload.records(n, tag, mix, info["seed_contact_id"], info["seed_account_id"])
    warm = workload.records(WARM, tag + "-warm", workload.Mix(keyed=0.0, by_id=1.0), info["seed_contact_id"],
                            info["seed_account_id"])
    session: Any = None
    stand.reset()
    if contender in ("ours-http", "ours-queue"):
        os.environ["PYTHON_THREADPOOL_THREAD_COUNT"] = str(threads)
        instance.reset()  # a fresh instance: settings, secret, token, pool and contact cache built on first use
        call = workload.ours_http() if contender == "ours-http" else workload.ours_queue()
    elif contender == "raw":
        call, session = workload.raw(info, threads, workload.fetch_token(info))
    elif contender == "sdk":
        call, session = workload.sdk(info)
    else:
        call = workload.naive(info)
    for rec in warm:
        err = call(rec)
        if err:
            raise RuntimeError(f"{contender} warm-up failed: {err}")
    cold = service_counts(stand.snapshot())
    stand.reset()
    before = stand.snapshot()
    busy0 = busy_cpu_s()
    pool = workload.drive(call, recs, threads, timeout)
    busy1 = busy_cpu_s()
    after = stand.snapshot()
    sdk_pool = session._session.get_adapter("https://")._pool_maxsize if contender == "sdk" else None
    if session is not None:
        session.close()
    if sdk_pool is not None:
        pool_size = sdk_pool  # requests' default: the SDK makes its own session and takes no pool size
    elif contender.startswith("ours"):
        pool_size = instance.intake().client.session.get_adapter("https://").poolmanager.connection_pool_kw.get(
            "maxsize")
        instance.reset()
    else:
        pool_size = threads
    run = service_counts(after)
    lat = sorted(pool.latencies)
    ok = len(lat)
    per_k = 1000 / n
    standin_cpu = after["cpu"] - before["cpu"]
    return {
        "contender": contender, "threads": threads, "n": n, "ok": ok, "errors": dict(pool.errors),
        "unfinished": pool.unfinished, "wall_s": pool.wall, "throughput": ok / pool.wall if pool.wall else 0.0,
        "p50_ms": pct(lat, 50) * 1000, "p95_ms": pct(lat, 95) * 1000, "p99_ms": pct(lat, 99) * 1000,
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"), "pool_size": pool_size,
        "by_way_ms": {way: {"n": len(xs), "p50": pct(sorted(xs), 50) * 1000, "p99": pct(sorted(xs), 99) * 1000}
                      for way, xs in sorted(pool.by_way.items())},
        "per_1000": {
            "dataverse_requests": run["dataverse"]["requests"] * per_k,
            "token_requests": run["entra"]["tokens_dataverse"] * per_k,
            "vault_reads": run["vault"]["reads"] * per_k,
            "connections": {k: v * per_k for k, v in run["connections"].items()},
        },
        "run": run, "cold": cold,
        "ways": {w: sum(r.way == w for r in recs) for w in ("contact", "account", "email-repeat", "email-new")},
        "keyed": sum(r.keyed for r in recs),
        # the fewest Dataverse requests this mix allows a fresh instance: one write per record, one lookup per
        # distinct repeat caller, a lookup and a create per new caller (the baselines bind ids and only write)
        "dataverse_floor": n + (len({r.case_email for r in recs if r.way == "email-repeat"})
                                + 2 * sum(r.way == "email-new" for r in recs) if contender.startswith("ours") else 0),
        "distinct_repeat_callers": len({r.case_email for r in recs if r.way == "email-repeat"}),
        "cpu_s": {"client": pool.cpu, "standin": standin_cpu},
        "cores_busy": {"client": pool.cpu / pool.wall, "standin": standin_cpu / pool.wall,
                       # everything else on the machine during the run (other jobs, the kernel's share)
                       "others": None if busy0 is None or busy1 is None else
                       max(busy1 - busy0 - pool.cpu - standin_cpu, 0.0) / pool.wall},
    }


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (threads, contender): the round with the median throughput, with every round's figure."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rounds:
        groups.setdefault((r["threads"], r["contender"]), []).append(r)
    rows = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["throughput"])
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["rounds"] = {"throughput": [r["throughput"] for r in group], "p99_ms": [r["p99_ms"] for r in group]}
        rows.append(row)
    return rows


def round_ratios(rounds: list[dict[str, Any]], r: dict[str, Any], key: str, peer: str = "raw") -> list[float]:
    """ours / peer for `key`, round by round (the two ran in the same round, under the same load)."""
    raw = {x["round"]: x[key] for x in rounds if x["contender"] == peer and x["threads"] == r["threads"]}
    return [x[key] / raw[x["round"]] for x in rounds
            if x["contender"] == r["contender"] and x["threads"] == r["threads"] and raw.get(x["round"])]


def targets(runs: list[dict[str, Any]], cold: dict[str, Any] | None,
            rounds: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each target, per thread count and entry point of ours, with pass/short and the figure."""
    out: list[dict[str, Any]] = []

    def add(name: str, scope: str, value: float, limit: float, ok: bool, unit: str = "", note: str = "") -> None:
        out.append({"target": name, "scope": scope, "value": value, "limit": limit, "unit": unit,
                    "result": "pass" if ok else "short", "note": note})

    floors = {r["threads"]: r for r in runs if r["contender"] == "raw"}
    sdks = {r["threads"]: r for r in runs if r["contender"] == "sdk"}
    for r in runs:
        if r["contender"].startswith("ours") and r["threads"] in sdks:
            scope = f"{r['contender']} @{r['threads']}"
            over = r["throughput"] / sdks[r["threads"]]["throughput"]
            per_round = round_ratios(rounds or [], r, "throughput", "sdk")
            add("throughput >= 1.10 x Microsoft's SDK", scope, over, TARGETS["over_sdk"],
                over >= TARGETS["over_sdk"], "x",
                "round by round: " + ", ".join(f"{x:.2f}" for x in per_round) if len(per_round) > 1 else "")
        if not r["contender"].startswith("ours") or r["threads"] not in floors:
            continue
        floor = floors[r["threads"]]
        scope = f"{r['contender']} @{r['threads']}"
        k = 1000 / r["n"]
        thr = r["throughput"] / floor["throughput"]
        per_round = round_ratios(rounds or [], r, "throughput")
        add("throughput >= 0.95 x raw", scope, thr, TARGETS["throughput"], thr >= TARGETS["throughput"], "x",
            "round by round: " + ", ".join(f"{x:.2f}" for x in per_round) if len(per_round) > 1 else "")
        p99 = r["p99_ms"] / floor["p99_ms"]
        per_round = round_ratios(rounds or [], r, "p99_ms")
        add("p99 <= 1.2 x raw", scope, p99, TARGETS["p99"], p99 <= TARGETS["p99"], "x",
            "round by round: " + ", ".join(f"{x:.2f}" for x in per_round) if len(per_round) > 1 else "")
        tok = (r["run"]["entra"]["tokens_dataverse"] + r["cold"]["entra"]["tokens_dataverse"]) * k
        add("token requests per 1,000 <= 1 (cold start included)", scope, tok, 1, tok <= TARGETS["tokens"])
        kv = (r["run"]["vault"]["reads"] + r["cold"]["vault"]["reads"]) * k
        add("Key Vault reads per 1,000 <= 1 (cold start included)", scope, kv, 1, kv <= TARGETS["vault_reads"])
        conns = r["run"]["connections"]["dataverse"] + r["cold"]["connections"]["dataverse"]
        add("new Dataverse TCP connections (cold start included) <= pool size (threads)", scope, conns,
            r["threads"], conns <= r["threads"])
        dv = r["per_1000"]["dataverse_requests"]
        add("Dataverse requests per 1,000 <= 1,100", scope, dv, TARGETS["dataverse"], dv <= TARGETS["dataverse"],
            note=f"this mix's floor on a fresh instance: {r['dataverse_floor'] * k:.0f}")
    if cold and cold.get("imports"):
        over = cold["imports"]["app_over_libraries"]
        add("import function_app adds <= 30 % over azure.functions + requests", "cold start", over,
            TARGETS["import"], over is not None and over <= TARGETS["import"], "ratio")
    return out


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def table(runs: list[dict[str, Any]]) -> str:
    floors = {r["threads"]: r for r in runs if r["contender"] == "raw"}
    head = ("| contender | threads | ok/N | rec/s (range of rounds) | x raw | p50 ms | p95 ms | p99 ms | p99 x raw "
            "| DV req/1k | DV tokens/1k | KV reads/1k | new conns in run dv/entra/kv | cold: DV tok, KV reads, conns "
            "| client CPU ms/rec (cores) | stand-in CPU ms/rec (cores) | others (cores) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        f = floors.get(r["threads"])
        c, cc = r["run"]["connections"], r["cold"]["connections"]
        spread = r["rounds"]["throughput"]
        shown = _f(r["throughput"]) + (f" ({_f(min(spread), 0)}-{_f(max(spread), 0)})" if len(spread) > 1 else "")
        lines.append(
            f"| {r['contender']} | {r['threads']} | {r['ok']}/{r['n']} | {shown} "
            f"| {_f(r['throughput'] / f['throughput'], 2) if f else '-'} | {_f(r['p50_ms'])} | {_f(r['p95_ms'])} "
            f"| {_f(r['p99_ms'])} | {_f(r['p99_ms'] / f['p99_ms'], 2) if f else '-'} "
            f"| {_f(r['per_1000']['dataverse_requests'], 0)} | {_f(r['per_1000']['token_requests'], 1)} "
            f"| {_f(r['per_1000']['vault_reads'], 1)} | {c['dataverse']}/{c['entra']}/{c['vault']} "
            f"| {r['cold']['entra']['tokens_dataverse']}, {r['cold']['vault']['reads']}, {sum(cc.values())} "
            f"| {_f(r['cpu_s']['client'] / r['n'] * 1000, 2)} ({_f(r['cores_busy']['client'], 2)}) "
            f"| {_f(r['cpu_s']['standin'] / r['n'] * 1000, 2)} ({_f(r['cores_busy']['standin'], 2)}) "
            f"| {'-' if r['cores_busy']['others'] is None else _f(r['cores_busy']['others'], 2)} |")
    return "\n".join(lines)


def report(doc: dict[str, Any]) -> str:
    m, a = doc["machine"], doc["args"]
    out = [f"# Intake benchmark ({doc['finished']})", "",
           f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, load average before/after "
           f"{m['loadavg_before'][0]:.2f}/{m['loadavg_after'][0]:.2f}. Stand-in in a child process on the "
           f"same CPUs (its CPU time is in the table). Latency added per request: Dataverse "
           f"{a['latency_dataverse'] * 1000:.0f} ms, Entra ID {a['latency_token'] * 1000:.0f} ms, Key Vault "
           f"{a['latency_vault'] * 1000:.0f} ms. N = {a['n']} records per run; mix: {doc['mix']}.", "",
           table(doc["runs"]), "",
           "DV = Dataverse; tokens = Dataverse-scope token POSTs; KV reads = vault GETs answered 200. Per-1k columns "
           "are for the measured run; the cold-start columns are the warm-up's (first token, vault read, first "
           "connections). Cores = CPU seconds / wall seconds.", ""]
    if doc.get("coldstart"):
        cs = doc["coldstart"]
        im, fc = cs.get("imports"), cs.get("first_call")
        out.append("## Cold start")
        if im:
            med = im["median_s"]
            out.append(f"- import (median of {im['runs']} fresh interpreters): `pass` {med['interpreter'] * 1000:.0f} "
                       f"ms, `import azure.functions, requests` {med['libraries'] * 1000:.0f} ms, `import "
                       f"function_app` {med['function_app'] * 1000:.0f} ms -> the app adds "
                       f"{im['app_over_libraries'] * 100:+.0f} % over its two libraries "
                       f"({im['app_import_s'] * 1000:.0f} vs {im['libraries_import_s'] * 1000:.0f} ms). With "
                       f"telemetry configured (APPLICATIONINSIGHTS_CONNECTION_STRING set): `import function_app` "
                       f"{med['function_app_telemetry'] * 1000:.0f} ms.")
        if fc:
            ob = fc["outbound"]
            out.append(f"- first invocation after import (median of {fc['runs']} fresh processes): import measured "
                       "inside the process "
                       f"{fc['import_s'] * 1000:.0f} ms, first create_case {fc['call_s'] * 1000:.0f} ms (status "
                       f"{fc['status']}); outbound: Entra ID {ob['entra']['requests']} "
                       f"{ob['entra']['by_kind']} (tokens: {ob['entra']['tokens_dataverse']} Dataverse, "
                       f"{ob['entra']['tokens_vault']} vault), Key Vault {ob['vault']['requests']} "
                       f"({ob['vault']['reads']} reads), Dataverse {ob['dataverse']['requests']} "
                       f"{ob['dataverse']['by_kind']}; connections {ob['connections']}.")
        out.append("")
    out.append("## Targets")
    for t in doc["targets"]:
        v = t["value"]
        shown = f"{v:.2f}" if isinstance(v, float) else str(v)
        more = f"; {t['note']}" if t.get("note") else ""
        out.append(f"- {t['result'].upper():5} {t['target']} [{t['scope']}]: {shown} (limit {t['limit']}{more})")
    naive = [r for r in doc["runs"] if r["contender"] in ("naive", "sdk")]
    floors = {r["threads"]: r for r in doc["runs"] if r["contender"] == "raw"}
    for r in naive:
        f = floors.get(r["threads"])
        if f:
            out.append(f"- {r['contender']} @{r['threads']} for comparison: "
                       f"{r['throughput'] / f['throughput']:.2f} x raw throughput, "
                       f"p99 {r['p99_ms'] / f['p99_ms']:.2f} x raw")
    if doc.get("notes"):
        out += ["", "## Notes", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(out) + "\n"


def notes(runs: list[dict[str, Any]], rounds: list[dict[str, Any]], machine: dict[str, Any]) -> list[str]:
    out = ["The stand-in is a Python process on the same 2 cores as the client: the client process (one GIL) "
           "tops out near 1 core, so throughput here is about client CPU per record, not the added latency; "
           "the CPU columns say where the time went."]
    load = machine.get("loadavg_before")
    measured = all(r["cores_busy"]["others"] is not None for r in rounds)
    if load and load[0] > 1.5 and not measured:
        out.append(f"Other processes were busy when the run started (load average {load[0]:.1f}, {load[1]:.1f}, "
                   f"{load[2]:.1f}; after: {machine['loadavg_after'][0]:.1f}): figures are noisier than usual.")
    busy = [(f"{r['contender']} @{r['threads']} round {r['round']}", r["cores_busy"]["others"]) for r in rounds
            if (r["cores_busy"]["others"] or 0) >= 0.25]
    if busy:
        out.append("Other processes took CPU during these rounds (cores): "
                   + ", ".join(f"{name} {c:.2f}" for name, c in busy) + ".")
    floors = {r["threads"]: r for r in runs if r["contender"] == "raw"}
    for r in runs:
        f = floors.get(r["threads"])
        if r["contender"].startswith("ours") and f:
            ways = ", ".join(f"{w} p50 {v['p50']:.0f} / p99 {v['p99']:.0f} ms (n={v['n']})"
                             for w, v in r["by_way_ms"].items())
            out.append(f"{r['contender']} @{r['threads']}: latency by customer kind: {ways}; raw p50 "
                       f"{f['p50_ms']:.0f} / p99 {f['p99_ms']:.0f} ms (one POST each).")
        if r["contender"].startswith("ours"):
            floor = r["dataverse_floor"]
            got = r["run"]["dataverse"]["requests"]
            out.append(f"{r['contender']} @{r['threads']}: {got} Dataverse requests for {r['n']} records; this mix "
                       f"allows no fewer than {floor} on a fresh instance ({r['n']} writes, "
                       f"{r['distinct_repeat_callers']} lookups of repeat callers, {r['ways']['email-new']} lookups "
                       f"+ creates of new callers) = {floor * 1000 / r['n']:.0f} per 1,000; excess {got - floor} "
                       f"(by kind: {r['run']['dataverse']['by_kind']}).")
        if r["cores_busy"]["standin"] >= 0.85:
            out.append(f"{r['contender']} @{r['threads']}: the stand-in used {r['cores_busy']['standin']:.2f} "
                       "cores (one Python process: ~1 core is its ceiling) — it is at or near its limit.")
        if r["cores_busy"]["client"] >= 0.85:
            out.append(f"{r['contender']} @{r['threads']}: the client process used {r['cores_busy']['client']:.2f} "
                       "cores — CPU (GIL) bound, not latency bound.")
        if r["errors"] or r["unfinished"]:
            out.append(f"{r['contender']} @{r['threads']}: errors {r['errors']}, unfinished {r['unfinished']}.")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="records per run")
    p.add_argument("--threads", default="16,32", help="worker thread counts, comma separated")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--latency-dataverse", type=float, default=0.020, help="seconds added per Dataverse request")
    p.add_argument("--latency-token", type=float, default=0.050, help="seconds added per Entra ID request")
    p.add_argument("--latency-vault", type=float, default=0.0, help="seconds added per Key Vault request")
    p.add_argument("--keyed", type=float, default=0.5)
    p.add_argument("--by-id", type=float, default=0.4)
    p.add_argument("--new-callers", type=float, default=0.1, help="share of by-email events from new callers")
    p.add_argument("--callers", type=int, default=200, help="distinct repeat callers")
    p.add_argument("--repeat", type=int, default=3, help="rounds per contender and thread count (median shown)")
    p.add_argument("--naive-repeat", type=int, default=1, help="rounds of the (slow) naive client")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds one run may take at most")
    p.add_argument("--import-runs", type=int, default=7)
    p.add_argument("--first-call-runs", type=int, default=3)
    p.add_argument("--no-coldstart", action="store_true")
    p.add_argument("--out", default=str(ROOT / ".local" / "bench"), help="folder for latest.json/md (untracked)")
    p.add_argument("--commit", action="store_true", help="write bench/results/, the committed figures, instead")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",") if t.strip()]
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or a.n < 1 or not threads:
        p.error(f"bad arguments: unknown contenders {sorted(unknown)}" if unknown else "n and threads must be > 0")
    mix = workload.Mix(a.keyed, a.by_id, a.new_callers, a.callers)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rounds: list[dict[str, Any]] = []
    cold: dict[str, Any] = {}
    with RemoteStandIn(a.latency_token, a.latency_dataverse, a.latency_vault) as stand:
        os.environ.update(stand.info["env"])
        stand.add_records("contacts", [(cid, {"emailaddress1": email, "lastname": f"Caller {i}"})
                                       for i, (email, cid) in ((i, workload.caller(i)) for i in range(a.callers))])
        for t in threads:
            for round_ in range(max(a.repeat, a.naive_repeat)):
                for c in contenders if round_ % 2 == 0 else contenders[::-1]:
                    if round_ >= (a.naive_repeat if c == "naive" else a.repeat):
                        continue
                    print(f"round {round_ + 1}: {c} @{t} threads, N={a.n} ...", file=sys.stderr, flush=True)
                    r = run_one(c, t, a.n, mix, stand, a.timeout)
                    r["round"] = round_ + 1
                    print(f"  {r['throughput']:.0f} rec/s, p99 {r['p99_ms']:.0f} ms, errors {r['errors']}",
                          file=sys.stderr, flush=True)
                    rounds.append(r)
        runs = summarize(rounds)
        if not a.no_coldstart:
            print("cold start ...", file=sys.stderr, flush=True)
            cold["imports"] = coldstart.import_times(sys.executable, str(ROOT), a.import_runs)
            case = {"title": "Cold start", "customer": {"contactId": stand.info["seed_contact_id"]}}
            cold["first_call"] = coldstart.first_invocations(sys.executable, str(ROOT), stand.info["env"], case,
                                                             stand, a.first_call_runs)
    doc = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "implementation": platform.python_implementation()},
        "args": vars(a), "mix": dataclasses.asdict(mix),
        "runs": runs, "rounds": rounds, "coldstart": cold, "targets": targets(runs, cold, rounds),
    }
    doc["machine"]["loadavg_before"] = load_before
    doc["machine"]["loadavg_after"] = os.getloadavg()
    doc["notes"] = notes(runs, rounds, doc["machine"])
    text = report(doc)
    out = ROOT / "bench" / "results" if a.commit else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "latest.md").write_text(text)
    print(text)
    print(f"wrote {out / 'latest.json'} and {out / 'latest.md'} in {doc['duration_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
