"""The fleet's per-instance settings, by the template's formula: the one the fleet test and benchmark run.

infra/main.bicep computes them at deploy time (`perInstance`, `queueBatchSize`); tests/test_infra.py
evaluates the template's own expressions and checks them against this function, so the topology we
measure is the one we deploy.
"""

from __future__ import annotations

from dataclasses import dataclass

BUDGET = 52  # the application user's concurrent requests (service protection), the template's default
MAX_INSTANCES = 40  # the template's maximumInstanceCount default
QUEUE_BATCH_MIN = 8  # queue messages in flight per instance, whatever its Dataverse share
QUEUE_BATCH_MAX = 32  # the host's own ceiling for batchSize


@dataclass(frozen=True)
class Topology:
    dataverse_concurrency: int  # INTAKE_DATAVERSE_CONCURRENCY
    queue_batch: int  # AzureFunctionsJobHost__extensions__queues__batchSize
    new_batch_threshold: int  # ...__newBatchThreshold

    @property
    def env(self) -> dict[str, str]:
        return {"INTAKE_DATAVERSE_CONCURRENCY": str(self.dataverse_concurrency),
                "AzureFunctionsJobHost__extensions__queues__batchSize": str(self.queue_batch),
                "AzureFunctionsJobHost__extensions__queues__newBatchThreshold": str(self.new_batch_threshold)}


def per_instance(budget: int = BUDGET, instances: int = MAX_INSTANCES) -> Topology:
    """Instances x Dataverse concurrency within the budget; queue messages in flight decoupled from it.

    The creates of the messages that wait for the instance's Dataverse slots go out together as one
    `$batch` when a slot frees (shared/batching.py), so a queue batch larger than the Dataverse share
    costs no extra Dataverse concurrency.
    """
    dataverse = max(1, budget // instances)
    queue_batch = min(QUEUE_BATCH_MAX, max(QUEUE_BATCH_MIN, dataverse))
    return Topology(dataverse, queue_batch, queue_batch // 2)
