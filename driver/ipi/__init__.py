"""The i-PI side of the driver: the socket ``client`` (protocol), the ``pes`` class i-PI's own drivers can load,
the ``mpi_committee`` that spreads members over ranks, and the ``batch_server`` that serves many i-PI
trajectories from one process (``nanosil-batch-driver``)."""
