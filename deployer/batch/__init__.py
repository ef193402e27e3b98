"""Batch scoring: a dataset file in, the same file with predictions appended out.

``plan_batch`` checks a file against a model's signature before a job exists;
``run_batch`` scores it chunk by chunk through a ``Scorer`` (a serving instance
started with ``serving_instance``, or onnxruntime in this process), resumable from
its checkpoint after any kill; ``probe_chunk_rows`` picks the chunk size the scorer
serves fastest.
"""

from deployer.batch.formats import BatchInputError, InputFormat, detect_format
from deployer.batch.job import (
    DEFAULT_CHUNK_ROWS,
    BatchCancelled,
    BatchFailed,
    BatchPlan,
    BatchProgress,
    BatchRequest,
    BatchResult,
    ChunkProbe,
    plan_batch,
    probe_chunk_rows,
    run_batch,
)
from deployer.batch.mapping import MappingError
from deployer.batch.scorer import (
    InstanceRequest,
    OnnxScorer,
    RowsRefused,
    Scorer,
    ScoringError,
    V2Scorer,
    serving_instance,
)
from deployer.batch.writers import OUTPUT_SUFFIX

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "OUTPUT_SUFFIX",
    "BatchCancelled",
    "BatchFailed",
    "BatchInputError",
    "BatchPlan",
    "BatchProgress",
    "BatchRequest",
    "BatchResult",
    "ChunkProbe",
    "InputFormat",
    "InstanceRequest",
    "MappingError",
    "OnnxScorer",
    "RowsRefused",
    "Scorer",
    "ScoringError",
    "V2Scorer",
    "detect_format",
    "plan_batch",
    "probe_chunk_rows",
    "run_batch",
    "serving_instance",
]
