"""``manage.py build_base_image``: build the base image locally, for hosts with no registry."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from deployer.errors import DeployerError
from deployer.images import base_image_build, docker_client, image_get
from portal.core import engine


class Command(BaseCommand):
    help = (
        "Build a minimal Debian + Python 3.11 base image with debootstrap and import it into "
        "the Docker engine (run as root on the Docker host). ModelPort uses it when the "
        "configured MODELPORT_BASE_IMAGE cannot be pulled."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--tag",
            default=settings.MODELPORT_LOCAL_BASE_IMAGE,
            help="image reference to create (default: MODELPORT_LOCAL_BASE_IMAGE)",
        )
        parser.add_argument("--suite", default="bookworm", help="Debian suite (default bookworm)")
        parser.add_argument(
            "--force", action="store_true", help="build even when the image already exists"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tag: str = options["tag"]
        try:
            if not options["force"] and image_get(docker_client(), tag) is not None:
                self.stdout.write(f"{tag} already exists (use --force to build it again).")
                return
            built = base_image_build(
                tag,
                suite=options["suite"],
                work_dir=engine.image_config().base.work_dir,
                log=self.stdout.write,
            )
        except DeployerError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"{built.ref} ({built.image_id[:19]}, {built.size_bytes / 1e6:.0f} MB) built in "
                f"{built.build_seconds:.0f} s"
            )
        )
