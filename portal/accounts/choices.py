"""Choices for teams and memberships."""

from django.db import models


class Role(models.TextChoices):
    """What a team member may do: read, also change, also administer."""

    VIEWER = "viewer", "Viewer"
    MEMBER = "member", "Member"
    ADMIN = "admin", "Admin"


ROLE_RANK = {Role.VIEWER: 1, Role.MEMBER: 2, Role.ADMIN: 3}
