"""Create an API token for a user in a team (for bootstrapping CI). Prints it once."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from portal.accounts.models import Membership, Team
from portal.accounts.services import token_create


class Command(BaseCommand):
    help = "Create an API token; the token is printed once and stored only as a hash."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--user", default="admin")
        parser.add_argument("--team", default="default")
        parser.add_argument("--name", default="cli")

    def handle(self, *args: Any, user: str, team: str, name: str, **options: Any) -> None:
        account = get_user_model().objects.filter(username=user).first()
        if account is None:
            raise CommandError(f"No user {user!r}.")
        found = Team.objects.filter(slug=team).first()
        if found is None:
            raise CommandError(f"No team {team!r}.")
        if not Membership.objects.filter(user=account, team=found).exists():
            raise CommandError(f"{user!r} is not a member of {team!r}.")
        _, token = token_create(user=account, team=found, name=name)
        self.stdout.write(token)
