"""The model registry: trained models by name and version in PostgreSQL (a library every service may use).

The trainer registers what it exports; the model runner (and anything that loads a model) resolves
``"name"`` (the latest version) or ``"name:version"`` to the model's URI.
"""

from services.registry.models import (
    RegisteredModel,
    is_registry_ref,
    latest,
    latest_of_each,
    list_versions,
    parse_ref,
    register,
    resolve,
    resolve_model_uri,
)

__all__ = [
    "RegisteredModel",
    "is_registry_ref",
    "latest",
    "latest_of_each",
    "list_versions",
    "parse_ref",
    "register",
    "resolve",
    "resolve_model_uri",
]
