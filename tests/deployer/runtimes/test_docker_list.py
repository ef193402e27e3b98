"""Listing our containers while another rollout removes one of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docker.errors import NotFound

from deployer.runtimes.docker import LIST_ATTEMPTS, DockerRuntime, DockerSettings


class _Racing:
    """docker-py's list inspects each container it listed; the first ``races`` lists meet
    one that was removed in between."""

    def __init__(self, races: int) -> None:
        self.races = races
        self.calls = 0
        self.containers = self

    def list(self, **_: Any) -> list[Any]:
        self.calls += 1
        if self.calls <= self.races:
            raise NotFound("No such container: 0b4422")
        return ["ours"]


def _runtime(client: Any, tmp_path: Path) -> DockerRuntime:
    return DockerRuntime(DockerSettings(installation="racetest", log_dir=tmp_path), client=client)


def test_a_container_removed_mid_list_does_not_fail_the_list(tmp_path: Path) -> None:
    racing = _Racing(races=2)
    assert _runtime(racing, tmp_path)._list(all_states=True) == ["ours"]
    assert racing.calls == 3


def test_a_list_that_keeps_racing_gives_up_with_the_engines_error(tmp_path: Path) -> None:
    racing = _Racing(races=LIST_ATTEMPTS)
    with pytest.raises(NotFound):
        _runtime(racing, tmp_path)._list(all_states=False)
    assert racing.calls == LIST_ATTEMPTS
