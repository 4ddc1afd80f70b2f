"""Fake `habana_frameworks.torch`: like the real one, importing it registers the `hpu_backend` compiler."""

from habana_frameworks.torch import core, dynamo, hpex, hpu  # noqa: F401

dynamo.register()
