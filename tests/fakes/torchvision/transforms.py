"""Import-only (see the package docstring)."""


def __getattr__(name: str):
    raise AttributeError(f"torchvision stand-in: transforms.{name} is not available in the tests")
