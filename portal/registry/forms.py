"""Forms for the model pages."""

from __future__ import annotations

from decimal import Decimal

from django import forms

from portal.deployments.choices import Device
from portal.registry.models import name_validator


class ModelCreateForm(forms.Form):
    name = forms.CharField(
        max_length=63,
        validators=[name_validator],
        help_text="Lower-case letters, digits and hyphens, e.g. fraud-detector.",
        widget=forms.TextInput(attrs={"placeholder": "fraud-detector", "autocomplete": "off"}),
    )
    description = forms.CharField(
        required=False, max_length=4000, widget=forms.Textarea(attrs={"rows": 2})
    )


class DeployForm(forms.Form):
    """The Deploy button's settings; all have defaults."""

    deployment = forms.CharField(max_length=63, validators=[name_validator], initial="production")
    device = forms.ChoiceField(choices=Device.choices, initial=Device.CPU)
    cpus = forms.DecimalField(
        min_value=Decimal("0.1"), max_value=Decimal(64), decimal_places=2, required=False
    )
    memory_mb = forms.IntegerField(min_value=128, max_value=262144, required=False)
    # On the GPU: how many per replica, or exactly which (device ids, comma-separated).
    gpu_count = forms.IntegerField(min_value=1, max_value=64, required=False)
    gpu_ids = forms.CharField(max_length=400, required=False)
