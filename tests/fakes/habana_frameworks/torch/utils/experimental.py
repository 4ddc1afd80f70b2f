"""Stand-in of `habana_frameworks.torch.utils.experimental`: the device type optimum-habana asks for."""

from __future__ import annotations

import enum

from habana_frameworks.torch import hpu  # noqa: F401  (optimum-habana reads htexp.hpu)


class synDeviceType(enum.IntEnum):  # noqa: N801  (the bridge's name)
    synDeviceGaudi = 1
    synDeviceGaudi2 = 2
    synDeviceGaudi3 = 3


def _get_device_type() -> synDeviceType:
    return synDeviceType.synDeviceGaudi2
