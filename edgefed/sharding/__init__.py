"""Sharded aggregation: stateless aggregator workers over MQTT 5 shared subscriptions.

Workers (:mod:`.worker`, ``edgefed aggregator``) each sum a share of a round's updates
straight from their compressed form and publish a partial (:mod:`.partial`) when the
coordinator closes the round; the coordinator's side (:mod:`.driver`, :mod:`.merge`)
tracks the workers, handles a lost one and merges the partials, counting every accepted
update exactly once. Deployment: docs/scale-out.md. Torch-free.
"""

from edgefed.sharding.config import ShardingConfig, WorkerConfig
from edgefed.sharding.driver import ShardedAggregation
from edgefed.sharding.merge import MergeResult, PartialMerger
from edgefed.sharding.partial import Key, Partial, decode_partial, encode_partial
from edgefed.sharding.topics import ShardTopics
from edgefed.sharding.worker import AggregatorWorker

__all__ = [
    "AggregatorWorker",
    "Key",
    "MergeResult",
    "Partial",
    "PartialMerger",
    "ShardTopics",
    "ShardedAggregation",
    "ShardingConfig",
    "WorkerConfig",
    "decode_partial",
    "encode_partial",
]
