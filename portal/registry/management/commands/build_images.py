"""``manage.py build_images``: build the converter and runtime images ahead of the first upload.

``make run`` starts this in the background, so the first upload does not wait for a
converter image build (about 2-3 minutes on a 2-core host, cold) and the first
deployment does not wait for the runtime image. An upload that arrives meanwhile
waits on the same build lock and then uses the image this builds.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from deployer.errors import DeployerError
from portal.core import engine

KINDS = ("converter", "runtime")


class Command(BaseCommand):
    help = (
        "Build the converter image (and the CPU runtime image) on the Docker engine now, so "
        "the first upload and the first deployment do not wait for them. Without a Docker "
        "engine there is nothing to build and it says so."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--only", choices=KINDS, help="build only this image (default: both that are used)"
        )
        parser.add_argument(
            "--converter-families",
            default="core",
            help="comma-separated converter families to build: core (PyTorch, scikit-learn), "
            "trees (XGBoost, LightGBM, CatBoost), tensorflow (Keras, SavedModel), or all "
            "(default: core; the others are built at their first upload)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from deployer.convert.image import FAMILIES
        from deployer.images.build import BUILD_TIMEOUT_S, docker_client, engine_available

        wanted = [options["only"]] if options["only"] else list(KINDS)
        chosen = str(options["converter_families"])
        families = list(FAMILIES) if chosen == "all" else [f for f in chosen.split(",") if f]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise CommandError(
                f"Unknown converter family {unknown[0]!r}; choose from {', '.join(FAMILIES)}."
            )
        self.families = families
        if settings.MODELPORT_CONVERSION_SANDBOX == "local" and "converter" in wanted:
            self.stdout.write("Conversions run locally (MODELPORT_CONVERSION_SANDBOX=local).")
            wanted.remove("converter")
        if not engine.builds_images() and "runtime" in wanted:
            self.stdout.write("Instances run locally (MODELPORT_RUNTIME=local).")
            wanted.remove("runtime")
        if not wanted:
            return
        if not engine_available():
            self.stdout.write(
                "No Docker engine answers: no image to build (conversions run in a limited "
                "child process, instances as local processes)."
            )
            return
        client = docker_client(timeout_s=BUILD_TIMEOUT_S)
        try:
            for kind in wanted:
                self._build(kind, client)
        except DeployerError as exc:
            raise CommandError(exc.message) from exc

    def _build(self, kind: str, client: Any) -> None:
        if kind == "converter":
            for family in self.families:
                self._build_converter(family, client)
            return
        started = time.monotonic()
        if kind == "runtime":
            from deployer.images.runtime import runtime_image_ensure

            image = runtime_image_ensure(
                engine.image_config(), device="cpu", log=self.stdout.write, client=client
            ).image
        self._report(kind, image, started)

    def _build_converter(self, family: str, client: Any) -> None:
        from deployer.convert.image import converter_image_ensure

        started = time.monotonic()
        image = converter_image_ensure(
            engine.image_config(), family=family, log=self.stdout.write, client=client
        ).image
        self._report("converter" if family == "core" else f"{family} converter", image, started)

    def _report(self, kind: str, image: Any, started: float) -> None:
        how = "already built" if image.cached else f"built in {time.monotonic() - started:.0f} s"
        self.stdout.write(
            self.style.SUCCESS(
                f"The {kind} image {image.ref} is ready ({image.size_bytes / 1e6:.0f} MB, {how})"
            )
        )
