"""The autoscaling decision: replicas for the measured requests in flight, within bounds,
up at once and down only after the cooldown."""

from __future__ import annotations

import pytest

from deployer.autoscale import AutoscalePolicy, decide, inflight

POLICY = AutoscalePolicy(min_replicas=1, max_replicas=4, target_inflight=2.0, cooldown_s=60)


def test_in_flight_is_request_seconds_over_the_interval() -> None:
    assert inflight(10.0, 25.0, 5.0) == pytest.approx(3.0)
    assert inflight(10.0, 4.0, 5.0) == 0.0  # the counters restarted
    assert inflight(1.0, 2.0, 0.0) == 0.0


def test_up_at_once_to_what_the_load_needs_and_no_further_than_the_maximum() -> None:
    decision = decide(POLICY, 1, [5.2], since_last_change_s=1.0)
    assert decision is not None
    assert decision.replicas == 3
    assert decision.reason == (
        "1 → 3 replicas: 5.2 requests in flight per replica, over the target of 2"
    )
    capped = decide(POLICY, 2, [9.0, 9.0], since_last_change_s=None)
    assert capped is not None
    assert capped.replicas == 4
    assert capped.reason.endswith("(9 needed, the maximum is 4)")


def test_down_only_after_the_cooldown_and_never_below_the_minimum() -> None:
    assert decide(POLICY, 3, [0.5, 0.4, 0.3], since_last_change_s=30) is None
    later = decide(POLICY, 3, [0.5, 0.4, 0.3], since_last_change_s=61)
    assert later is not None
    assert later.replicas == 1
    assert "under the target of 2" in later.reason
    idle = decide(
        AutoscalePolicy(min_replicas=2, max_replicas=4, target_inflight=2.0, cooldown_s=0),
        3,
        [0.0, 0.0, 0.0],
        since_last_change_s=None,
    )
    assert idle is not None
    assert idle.replicas == 2


def test_no_change_when_the_load_fits_or_nothing_was_measured() -> None:
    assert decide(POLICY, 2, [1.5, 2.0], since_last_change_s=None) is None
    assert decide(POLICY, 2, [], since_last_change_s=None) is None


def test_a_count_outside_new_bounds_is_brought_inside() -> None:
    decision = decide(POLICY, 6, [0.1] * 6, since_last_change_s=0)
    assert decision is not None
    assert decision.replicas == 4


def test_a_policy_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="the minimum must be at least 1"):
        AutoscalePolicy(min_replicas=3, max_replicas=2, target_inflight=1)
    with pytest.raises(ValueError, match=r"target must be at least 0\.01"):
        AutoscalePolicy(min_replicas=1, max_replicas=2, target_inflight=0)
