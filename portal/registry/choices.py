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
    # Deleted by a team admin: hidden, never deployed again; storage GC removes its
    # files and image and marks it in MLflow (then ``purged_at`` is set).
    DELETED = "deleted", "Deleted"


FINAL_VERSION_STATUSES = frozenset(
    {VersionStatus.READY, VersionStatus.FAILED, VersionStatus.DELETED}
)
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
    TORCH_STATE_DICT = "torch_state_dict", "PyTorch state_dict + module source (archive)"
    SKOPS = "skops", "scikit-learn (skops)"
    PICKLE = "pickle", "scikit-learn (pickle)"
    JOBLIB = "joblib", "scikit-learn (joblib)"
    XGBOOST = "xgboost", "XGBoost (.json/.ubj)"
    LIGHTGBM = "lightgbm", "LightGBM (text model)"
    CATBOOST = "catboost", "CatBoost (.cbm)"
    KERAS = "keras", "Keras 3 (.keras)"
    TF_SAVED_MODEL = "tf_saved_model", "TensorFlow SavedModel (archive)"
    TRANSFORMERS = "transformers", "Hugging Face transformers folder (archive)"
