"""Status values for model versions."""

from django.db import models


class VersionStatus(models.TextChoices):
    """Where a version is in its pipeline; READY and FAILED are final."""

    UPLOADED = "uploaded", "Uploaded"
    VALIDATING = "validating", "Validating"
    CONVERTING = "converting", "Converting"
    REGISTERING = "registering", "Registering"
    BUILDING = "building", "Building"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


FINAL_VERSION_STATUSES = frozenset({VersionStatus.READY, VersionStatus.FAILED})
WORKING_VERSION_STATUSES = frozenset(
    {
        VersionStatus.VALIDATING,
        VersionStatus.CONVERTING,
        VersionStatus.REGISTERING,
        VersionStatus.BUILDING,
    }
)


class SourceFormat(models.TextChoices):
    """The format a version was uploaded in."""

    ONNX = "onnx", "ONNX"
    ONNX_ARCHIVE = "onnx_archive", "ONNX with external data (.zip/.tar.gz)"
    TORCHSCRIPT = "torchscript", "PyTorch TorchScript"
    TORCH_EXPORT = "torch_export", "PyTorch torch.export (.pt2)"
    SKOPS = "skops", "scikit-learn (skops)"
    PICKLE = "pickle", "scikit-learn (pickle)"
    JOBLIB = "joblib", "scikit-learn (joblib)"
