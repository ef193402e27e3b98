"""Celery tasks for rollouts, rollbacks and teardowns (queue ``deploy``, which no long work
shares): thin, id-taking, idempotent."""

from __future__ import annotations

from celery import Task, shared_task

from portal.celery import QUEUE_BATCH, QUEUE_DEPLOY
from portal.deployments import replicas, services
from portal.deployments.batch import services as batch_services


@shared_task(acks_late=True, queue=QUEUE_DEPLOY)
def revision_rollout(revision_id: int) -> None:
    """Roll out one revision (a redelivery restarts an interrupted rollout cleanly)."""
    services.revision_rollout(revision_id=revision_id)


@shared_task(acks_late=True, queue=QUEUE_DEPLOY)
def deployment_teardown(deployment_id: int, delete: bool) -> None:
    """Stop a deployment's instances (and delete it when asked)."""
    services.deployment_teardown(deployment_id=deployment_id, delete=delete)


# A batch job runs for as long as its dataset takes, on workers of its own. acks_late with
# reject_on_worker_lost: a worker killed mid-job gives the message back, and the next run
# resumes from the job's checkpoint. A redelivery while a live run holds the job's lock
# waits and looks again (the live run finishes the job; then it is a no-op).
@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    queue=QUEUE_BATCH,
    max_retries=720,
)
def batch_job_run(self: Task, job_id: int) -> None:
    """Run or resume one batch job."""
    if not batch_services.batch_job_run(job_id=job_id):
        raise self.retry(countdown=5)


@shared_task(acks_late=True, queue=QUEUE_DEPLOY)
def batch_jobs_resume() -> int:
    """Hand running batch jobs whose worker died back to a batch worker (a quick sweep)."""
    return batch_services.batch_jobs_resume()


@shared_task(acks_late=True, queue=QUEUE_DEPLOY)
def deployment_replicas_heal(deployment_id: int) -> None:
    """Replace replicas that ended and match the replica count (slots are claimed by a
    unique constraint, so two of these at once start nothing twice)."""
    replicas.deployment_replicas_heal(deployment_id=deployment_id)
