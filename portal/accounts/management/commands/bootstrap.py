"""Create the first administrator and team, once. Prints the generated password."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from portal.accounts.choices import Role
from portal.accounts.models import Team
from portal.accounts.services import membership_set, team_create


class Command(BaseCommand):
    help = "Create the admin user and the default team if they do not exist yet."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument("--team", default="default")
        parser.add_argument(
            "--password", default="", help="Use this password instead of a generated one."
        )

    @transaction.atomic
    def handle(self, *args: Any, username: str, team: str, password: str, **options: Any) -> None:
        users = get_user_model()
        user = users.objects.filter(username=username).first()
        if user is None:
            password = password or secrets.token_urlsafe(12)
            user = users.objects.create_superuser(username=username, email="", password=password)
            self.stdout.write(
                self.style.SUCCESS(
                    f"Created the administrator {username!r} with password: {password}\n"
                    "Sign in and change it (Django admin, /admin/password_change/)."
                )
            )
        else:
            self.stdout.write(f"The administrator {username!r} already exists.")
        found = Team.objects.filter(slug=team).first()
        if found is None:
            team_create(slug=team, name=team.replace("-", " ").title(), admin=user)
            self.stdout.write(f"Created the team {team!r} with {username!r} as its admin.")
        else:
            membership_set(team=found, user=user, role=Role.ADMIN)
