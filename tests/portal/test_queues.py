"""Long work and urgent work are routed to different queues with different workers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery import Task

from portal import celery as queues
from portal import stack
from portal.deployments import services as deployment_services
from portal.deployments.choices import RevisionStatus
from portal.deployments.models import Revision
from portal.registry.models import Model
from tests.conftest import REPO, Personas, Worker, _stop_local_instances, start_worker, wait_for
from tests.portal.factories import ready_version, running_deployment
from tests.portal.slow_tasks import BUSY_KEY, slow_conversion

LONG_TASKS = (
    "portal.registry.tasks.version_process",
    "portal.registry.tasks.version_convert",
    "portal.registry.tasks.version_build",
    "portal.deployments.tasks.batch_job_run",
)
URGENT_TASKS = (
    "portal.deployments.tasks.revision_rollout",
    "portal.deployments.tasks.deployment_teardown",
    "portal.core.tasks.reconcile",
    "portal.monitoring.tasks.metrics_scrape",
    "portal.deployments.tasks.batch_jobs_resume",
)


def _task(name: str) -> Task:
    queues.app.loader.import_default_modules()
    return queues.app.tasks[name]


def queue_of(name: str) -> str:
    """The queue Celery sends task ``name`` to, as ``.delay()`` would route it."""
    # The options apply_async starts from: if Celery stops honouring the queue declared on
    # the task (announced for 6.0), this routes to the default queue and the tests fail.
    options = dict(_task(name)._get_exec_options())
    return str(queues.app.amqp.router.route(options, name)["queue"].name)


def _option(command: list[str], flag: str, default: str) -> str:
    return command[command.index(flag) + 1] if flag in command else default


def stack_workers(tmp_path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(name, queues, concurrency) of each Celery worker ``make run`` starts."""
    found = []
    for service in stack._services({}, tmp_path, "127.0.0.1:1", None):
        command = service.command
        if Path(command[0]).name == "celery" and "worker" in command:
            found.append(
                (
                    service.name,
                    tuple(_option(command, "-Q", "celery").split(",")),
                    int(_option(command, "-c", "1")),
                )
            )
    return found


def compose_workers() -> list[tuple[str, tuple[str, ...]]]:
    """(name, queues) of each Celery worker docker-compose.yml starts."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    found = []
    for name, service in services.items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["celery"] and "worker" in command:
            found.append((name, tuple(_option(command, "-Q", "celery").split(","))))
    return found


def test_every_task_declares_its_queue_and_no_route_globs_by_module() -> None:
    from django.conf import settings

    assert not any("*" in pattern for pattern in settings.CELERY_TASK_ROUTES)
    ours = [name for name in _task(LONG_TASKS[0]).app.tasks if name.startswith("portal.")]
    assert set(LONG_TASKS + URGENT_TASKS) <= set(ours)
    for name in ours:
        assert _task(name).queue in queues.QUEUES, f"{name} does not name its queue"


@pytest.mark.parametrize("where", ["make run", "docker-compose"])
def test_no_worker_takes_long_work_and_urgent_work(where: str, tmp_path: Path) -> None:
    workers = (
        [(name, q) for name, q, _ in stack_workers(tmp_path)]
        if where == "make run"
        else compose_workers()
    )
    consumed = {q for _, worker_queues in workers for q in worker_queues}
    long_queues = {queue_of(name) for name in LONG_TASKS}
    urgent_queues = {queue_of(name) for name in URGENT_TASKS}
    assert long_queues | urgent_queues <= consumed, f"a queue nobody consumes in {where}"
    for name, worker_queues in workers:
        shared = set(worker_queues)
        assert not (shared & long_queues and shared & urgent_queues), (
            f"{where}: worker {name} takes long work ({sorted(shared & long_queues)}) and "
            f"urgent work ({sorted(shared & urgent_queues)})"
        )


def test_registry_and_deployments_task_modules_do_not_import_each_other() -> None:
    for app, other in (("registry", "deployments"), ("deployments", "registry")):
        source = (REPO / "portal" / app / "tasks.py").read_text()
        assert f"portal.{other}" not in source, f"portal/{app}/tasks.py imports {other}"
    services_source = (REPO / "portal" / "registry" / "services.py").read_text()
    assert "portal.deployments.tasks" not in services_source


@pytest.mark.e2e
def test_rollback_starts_within_2s_while_every_conversion_slot_is_busy(
    worker_env: dict[str, str], personas: Personas, onnx_file: Path, tmp_path: Path, settings: Any
) -> None:
    """The workers ``make run`` starts, on a real broker: slow conversions fill every slot of
    the workers that take conversions (with more waiting), then a rollback is requested."""
    conversion_queue = queue_of("portal.registry.tasks.version_convert")
    build_queue = queue_of("portal.registry.tasks.version_build")
    rollout_queue = queue_of("portal.deployments.tasks.revision_rollout")
    chosen = [
        (name, worker_queues, concurrency)
        for name, worker_queues, concurrency in stack_workers(tmp_path)
        if {conversion_queue, build_queue, rollout_queue} & set(worker_queues)
    ]
    slots = sum(c for _, worker_queues, c in chosen if conversion_queue in worker_queues)
    assert slots > 0
    broker = redis.Redis.from_url(worker_env["CELERY_BROKER_URL"])
    workers: list[Worker] = []
    try:
        for name, worker_queues, concurrency in chosen:
            workers.append(
                start_worker(
                    worker_env,
                    tmp_path / f"{name}.log",
                    queues=worker_queues,
                    concurrency=concurrency,
                    include=("tests.portal.slow_tasks",),
                )
            )
        for index in range(slots + 2):
            queue = conversion_queue if index % 2 == 0 else build_queue
            slow_conversion.apply_async(args=(60,), queue=queue)
        wait_for(
            lambda: int(broker.get(BUSY_KEY) or 0) >= slots,
            timeout_s=30,
            what=f"{slots} slow conversions running",
        )

        model = Model.objects.create(team=personas.acme, name="demo")
        first = ready_version(model, 1, onnx_file)
        second = ready_version(model, 2, onnx_file)
        deployment = running_deployment(second)
        asked = time.monotonic()
        revision = deployment_services.deployment_rollback(
            deployment=deployment, to_version=first, user=personas.alice.user
        )
        started = wait_for(
            lambda: (
                Revision.objects.filter(pk=revision.pk)
                .exclude(status=RevisionStatus.PENDING)
                .exists()
                and time.monotonic()
            ),
            timeout_s=20,
            interval_s=0.05,
            what="the rollback to start",
        )
        waited = started - asked
        busy = int(broker.get(BUSY_KEY) or 0)
        print(
            f"\nrollback started {waited:.2f} s after it was asked, with {busy} of {slots} "
            f"conversion slots busy (queues: conversions {conversion_queue}, builds "
            f"{build_queue}, rollouts {rollout_queue})"
        )
        assert busy >= slots, "the conversions were not all still running"
        assert waited < 2.0
    finally:
        for worker in workers:
            worker.kill()
        broker.flushdb()
        _stop_local_instances(Path(settings.DATA_DIR))
