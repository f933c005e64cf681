"""CLI: ``python -m devstack.standin --state-dir DIR [...]`` serves the stand-in until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.standin", description=__doc__)
    parser.add_argument("--state-dir", required=True, help="where certificates and standin.json go")
    parser.add_argument("--entra-port", type=int, default=0)
    parser.add_argument("--vault-port", type=int, default=0)
    parser.add_argument("--dataverse-port", type=int, default=0)
    parser.add_argument("--dataverse-latency", type=float, default=0.0, help="seconds per Dataverse request")
    parser.add_argument("--token-latency", type=float, default=0.0, help="seconds per Entra request")
    parser.add_argument("--token-lifetime", type=int, default=3599)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from .server import StandIn

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    standin = StandIn(args.token_latency, args.dataverse_latency, args.token_lifetime, args.seed,
                      state_dir=os.path.abspath(args.state_dir), entra_port=args.entra_port,
                      vault_port=args.vault_port, dataverse_port=args.dataverse_port)
    standin.start()
    try:
        path = os.path.join(os.path.abspath(args.state_dir), "standin.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(standin.info(), fh, indent=2)
        os.replace(tmp, path)
        print(f"stand-in ready: entra={standin.entra_url} vault={standin.vault_url} "
              f"dataverse={standin.dataverse_url} info={path}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
