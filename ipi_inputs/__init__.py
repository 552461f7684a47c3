"""i-PI's side of the files: the XML inputs (active-learning sampling, NVT and NVE production) and
:func:`render_input` that fills them (:mod:`.render`), and i-PI's files read and trimmed in one place
(:mod:`.files`: clusters, socket addresses, checkpoints, extras)."""

from .files import SocketAddress, read_cluster
from .render import render_input, thermostat_temperature

__all__ = ["render_input", "read_cluster", "thermostat_temperature", "SocketAddress"]
