"""IR spectra from files: MD spectra from dipole time series (autocorrelation of the dipole derivative),
harmonic IR from any ASE calculator, broadening, comparisons, and size/temperature sums for astronomers.
Depends on numpy, scipy, ASE and matplotlib only: no torch.
"""
