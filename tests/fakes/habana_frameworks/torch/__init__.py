"""Fake `habana_frameworks.torch`: importing it registers nothing with torch."""

from habana_frameworks.torch import core, hpex, hpu  # noqa: F401
