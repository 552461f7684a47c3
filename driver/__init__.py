"""nanosil's ML side: the models (Gaussian-moment energy/forces, charge-based dipole), their committee,
training, the ASE calculator, and the thin i-PI socket driver (`nanosil-driver`) that serves them.

Units inside Python: Å, eV, e·Å, fs. Atomic units appear only at the i-PI socket boundary.
"""
__version__ = "0.1.0"
