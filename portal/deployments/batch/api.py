"""REST API for batch jobs (``/api/v1/batch-jobs/...``)."""

from __future__ import annotations

from typing import Any

from django.http import FileResponse, Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.accounts.access import api_access
from portal.accounts.choices import Role
from portal.core.idempotency import IDEMPOTENCY_PARAMETER, idempotent
from portal.deployments.batch import selectors, services
from portal.deployments.batch.serializers import BatchJobCreateSerializer, BatchJobSerializer
from portal.registry import selectors as registry_selectors


class BatchJobListView(APIView):
    """The team's batch jobs, or a new one (a dataset scored with a model version)."""

    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        parameters=[OpenApiParameter("model", str, description="Only this model's jobs.")],
        responses=BatchJobSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        team = api_access(request).team
        name = request.query_params.get("model")
        model = registry_selectors.model_get(team=team, name=name) if name else None
        jobs = selectors.batch_job_list(team=team, model=model)[:200]
        return Response(BatchJobSerializer(jobs, many=True).data)

    @extend_schema(
        request={"multipart/form-data": BatchJobCreateSerializer},
        responses={202: BatchJobSerializer},
        parameters=[IDEMPOTENCY_PARAMETER],
    )
    @idempotent
    def post(self, request: Request) -> Response:
        """Queue a job; 400 ``mapping_mismatch`` names the column and input that do not fit."""
        access = api_access(request)
        data = BatchJobCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields: dict[str, Any] = data.validated_data
        model = registry_selectors.model_get(team=access.team, name=fields["model"])
        version = registry_selectors.version_get(model=model, number=fields["version"])
        access.require(Role.MEMBER, "run batch jobs")
        source = None
        if "input_job" in fields:
            source = selectors.batch_job_get(team=access.team, job_id=fields["input_job"])
        job = services.batch_job_create(
            version=version,
            user=access.user,
            file=fields.get("file"),
            source_job=source,
            mapping=fields.get("mapping"),
            chunk_rows=fields.get("chunk_rows"),
            max_errors=fields.get("max_errors"),
        )
        return Response(BatchJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class BatchJobDetailView(APIView):
    """One job: status, mapping, live progress, errors, output."""

    @extend_schema(responses=BatchJobSerializer)
    def get(self, request: Request, job_id: int) -> Response:
        job = selectors.batch_job_get(team=api_access(request).team, job_id=job_id)
        return Response(BatchJobSerializer(job).data)


class BatchJobCancelView(APIView):
    """Cancel a job: at once when queued, after its current chunk when running."""

    @extend_schema(request=None, responses={202: BatchJobSerializer})
    def post(self, request: Request, job_id: int) -> Response:
        access = api_access(request)
        job = selectors.batch_job_get(team=access.team, job_id=job_id)
        access.require(Role.MEMBER, "cancel batch jobs")
        job = services.batch_job_cancel(job=job, user=access.user)
        return Response(BatchJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class BatchJobOutputView(APIView):
    """The job's output file (the input's format with predictions appended, or .npz)."""

    @extend_schema(
        responses={(200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY)}
    )
    def get(self, request: Request, job_id: int) -> FileResponse:
        job = selectors.batch_job_get(team=api_access(request).team, job_id=job_id)
        return batch_output_response(job)


def batch_output_response(job: Any) -> FileResponse:
    """A download of the job's output (404 until it has one)."""
    path = job.output_path
    if path is None or not path.is_file():
        raise Http404(f"Batch job {job.pk} has no output (status {job.status}).")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name)
