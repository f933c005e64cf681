"""The fleet under Dataverse's service protection limits, small (issue 10; the large run: bench/fleet.py).

Eight instances in the template's topology (bench/topology.py: one Dataverse request and eight queue
messages in flight each) as separate processes, each with its own `function_app` import, drain one burst
from a shared Azurite queue with the host's queue semantics, against the stand-in enforcing the limits on a
scaled clock, in both regimes: Retry-After shorter than the per-call budget (throttled messages wait
inside their call) and longer (they are deferred). Whatever the figures, no message may be poisoned,
duplicated or lost, and none may spend a delivery on throttling; once the request budget bites, creates
go to Dataverse in $batch requests. A quarter of the events get a note on the `followups` queue, sent
before the burst: each overtakes its create, is deferred, and is added exactly once.
"""

from __future__ import annotations

import pytest

from bench.fleet import regimes, run
from bench.topology import per_instance


@pytest.fixture
def fleet_azurite():
    from tests.azurite import Azurite

    az = Azurite()  # its own: the fleet owns the `cases` queue while it runs
    yield az
    az.stop()


@pytest.mark.parametrize("regime", regimes("small"), ids=lambda r: r.name)
def test_fleet_drains_a_burst_exactly_once_without_poison(standin, fleet_azurite, regime, capsys):
    result = run(standin, fleet_azurite.connection_string, instances=8, messages=160, regime=regime, timeout=150,
                 followups=40)
    workers = result.pop("workers")
    with capsys.disabled():
        print(f"\nfleet {regime.name}: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    assert all("error" not in w and not w["errors"] for w in workers), workers
    assert (result["created"], result["duplicated"], result["lost"]) == (160, 0, 0)
    assert (result["poisoned"], result["left_in_queue"]) == (0, 0)
    assert result["host_retries"] == 0  # nothing raised back to the host: no delivery spent on throttling
    assert result["answered_429"] > 0  # the limits did bite: the test means something
    assert result["affinity_cookies_sent"] == 0  # no ARRAffinity cookie kept: spread over the web servers
    if not regime.retry_after_exceeds_budget:
        assert result["deliveries_per_message"] == 1.0  # waited inside the call: one delivery each
    else:
        assert result["deferrals"] > 0  # deferred instead of raised
    assert result["peak_concurrency"] <= 8 * per_instance().dataverse_concurrency  # the template's share each
    assert result["queue_batch"] >= 8
    assert result["records_per_request"] > 1.2  # the request budget bit: creates went in $batch requests
    assert (result["notes_created"], result["notes_duplicated"], result["notes_lost"]) == (40, 0, 0)
    assert (result["followups_poisoned"], result["followups_rejected"], result["followups_host_retries"]) == (0, 0, 0)
    assert result["followups_deferred_by_code"].get("record_not_found", 0) > 0  # they did overtake their creates
