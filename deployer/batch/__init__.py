"""Batch scoring: a dataset file in, the same file with predictions appended out.

``plan_batch`` checks a file against a model's signature before a job exists;
``run_batch`` scores it chunk by chunk through a ``Scorer`` (a serving instance
started with ``serving_instance``, or onnxruntime in this process), resumable from
its checkpoint after any kill.
"""

from deployer.batch.formats import BatchInputError, InputFormat, detect_format
from deployer.batch.job import (
    BatchCancelled,
    BatchFailed,
    BatchPlan,
    BatchProgress,
    BatchRequest,
    BatchResult,
    plan_batch,
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
    "OUTPUT_SUFFIX",
    "BatchCancelled",
    "BatchFailed",
    "BatchInputError",
    "BatchPlan",
    "BatchProgress",
    "BatchRequest",
    "BatchResult",
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
    "run_batch",
    "serving_instance",
]
