"""Writing the event timeline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from portal.core.choices import EventLevel
from portal.core.models import Event

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from portal.accounts.models import Team
    from portal.deployments.models import Deployment
    from portal.registry.models import Model, ModelVersion


def event_record(
    *,
    team: Team,
    step: str,
    message: str,
    actor: User | None = None,
    model: Model | None = None,
    version: ModelVersion | None = None,
    deployment: Deployment | None = None,
    level: str = EventLevel.INFO,
    duration_ms: int | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    """Add one entry to the timeline (and so to the audit log)."""
    if version is not None:
        model = model or version.model
        subject = f"{version.model.name} v{version.number}"
    elif deployment is not None:
        model = model or deployment.model
        subject = f"{deployment.model.name}/{deployment.name}"
    elif model is not None:
        subject = model.name
    else:
        subject = team.slug
    return Event.objects.create(
        team=team,
        actor=actor if actor is not None and actor.is_authenticated else None,
        model=model,
        version=version,
        deployment=deployment,
        subject=subject[:200],
        step=step,
        level=level,
        message=message,
        duration_ms=duration_ms,
        data=data or {},
    )


class StepTimer:
    """The elapsed time of a step, in milliseconds."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


@contextmanager
def timed() -> Iterator[StepTimer]:
    """Time a block: ``with timed() as t: ...; t.ms``."""
    yield StepTimer()
