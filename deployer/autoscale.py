"""How many replicas a deployment needs for the load its replicas measured.

The signal is requests in flight per replica: each replica's mean concurrency over the
last scrape interval, by Little's law from its own metrics (the growth of the request
duration histogram's sum, in seconds, over the interval's seconds; queue time included,
as the runtime counts a request from its arrival). No Django here: the portal gives the
loads and the policy, and records what is decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_TARGET_INFLIGHT = 0.01


@dataclass(frozen=True)
class AutoscalePolicy:
    """Between ``min_replicas`` and ``max_replicas``, about ``target_inflight`` requests in
    flight per replica; no scale-down within ``cooldown_s`` of the last change."""

    min_replicas: int
    max_replicas: int
    target_inflight: float
    cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"replicas {self.min_replicas}..{self.max_replicas}: the minimum must be at "
                "least 1 and not above the maximum"
            )
        if not self.target_inflight >= MIN_TARGET_INFLIGHT:
            raise ValueError(f"the target must be at least {MIN_TARGET_INFLIGHT} in flight")
        if not self.cooldown_s >= 0:
            raise ValueError("the cooldown cannot be negative")


@dataclass(frozen=True)
class ScaleDecision:
    """Run ``replicas`` from now on, because of ``reason`` (one line for the timeline)."""

    before: int
    replicas: int
    inflight_per_replica: float
    reason: str


def inflight(seconds_sum_before: float, seconds_sum_after: float, interval_s: float) -> float:
    """A replica's mean requests in flight over an interval (Little's law): the request
    seconds it served in the interval over the interval's length."""
    if interval_s <= 0 or seconds_sum_after < seconds_sum_before:
        return 0.0
    return (seconds_sum_after - seconds_sum_before) / interval_s


def decide(
    policy: AutoscalePolicy,
    current: int,
    loads: list[float],
    *,
    since_last_change_s: float | None,
) -> ScaleDecision | None:
    """The change to make now, or None.

    ``loads``: requests in flight measured on each ready replica. Up: as soon as the total
    needs more replicas than run (the new ones are readiness-gated before they get
    traffic). Down: one step to what the total needs, only once ``cooldown_s`` has passed
    since the last change, so a short lull does not take capacity away.
    """
    if not loads:
        return None
    total = sum(loads)
    per_replica = total / len(loads)
    needed = math.ceil(total / policy.target_inflight - 1e-9) if total > 0 else 0
    wanted = min(max(needed, policy.min_replicas), policy.max_replicas)
    if current < policy.min_replicas or current > policy.max_replicas:
        wanted = min(max(current, policy.min_replicas), policy.max_replicas)
    elif wanted == current or (
        wanted < current
        and (since_last_change_s is not None and since_last_change_s < policy.cooldown_s)
    ):
        return None
    side = "over" if wanted > current else "under"
    reason = (
        f"{current} → {wanted} replicas: {per_replica:.3g} requests in flight per replica, "
        f"{side} the target of {policy.target_inflight:g}"
    )
    if wanted in (policy.min_replicas, policy.max_replicas) and wanted != needed:
        bound = "maximum" if wanted == policy.max_replicas else "minimum"
        reason += f" ({needed} needed, the {bound} is {wanted})"
    return ScaleDecision(
        before=current, replicas=wanted, inflight_per_replica=per_replica, reason=reason
    )
