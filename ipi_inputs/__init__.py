"""i-PI XML inputs (active-learning sampling, NVT and NVE production) and the function that fills their
placeholders, shared by the active-learning manager and the production runner."""

from .render import SocketAddress, read_cluster, render_input, thermostat_temperature

__all__ = ["render_input", "read_cluster", "thermostat_temperature", "SocketAddress"]
