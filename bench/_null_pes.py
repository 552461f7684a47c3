"""A PES that computes nothing but answers like nanosil's driver (zero energy and forces, a dipole and
the dipole members in the extras), so that i-PI's own cost per step can be timed with the production
outputs. Batched calls (i-PI's ``batch_size``) are answered in one go.

    i-pi-py_driver -u -a SOCKET -m custom -P bench/_null_pes.py
"""
import json

import numpy as np

from ipi.pes.dummy import Dummy_driver

__DRIVER_NAME__ = "nanosil_null"
__DRIVER_CLASS__ = "NullDriver"

EXTRAS = json.dumps({"dipole": [0.0, 0.0, 0.0], "dipole_members": [[0.0, 0.0, 0.0]]})


class NullDriver(Dummy_driver):
    def compute_structure(self, cell, pos):
        return 0.0, np.zeros_like(pos), np.zeros((3, 3)), EXTRAS

    seen_batch = 0

    def compute(self, cell, pos):
        if isinstance(cell, list):
            if len(cell) > self.seen_batch:  # the bench reads it back: i-PI did batch the requests
                self.seen_batch = len(cell)
                print(f"batch of {len(cell)} structures", flush=True)
            return [self.compute_structure(c, p) for c, p in zip(cell, pos)]
        return self.compute_structure(cell, pos)
