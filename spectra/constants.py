"""Physical constants and unit factors for IR spectra, all derived from ``ase.units`` (CODATA).

The one that matters most: the IR intensity of a mode is

    I = N_A * pi / (3 * c^2 * 4 pi eps0) * |d mu / d Q|^2

with Q the mass-weighted normal coordinate. Expressed with |d mu / d Q|^2 in (D/Å)^2/amu this is
``KM_MOL_PER_D2_A2_AMU`` = 42.2561 km/mol (ASE's ``Infrared`` stores (D/Å)^2/amu and uses the rounded
Porezag value 42.255 only in its text summary; ``get_spectrum`` ignores ``intensity_unit`` altogether).
"""
from __future__ import annotations

import math

from ase import units

#: 1 (D/Å)^2/amu in km/mol (about 42.2561).
KM_MOL_PER_D2_A2_AMU: float = (
    units._Nav * math.pi / (3.0 * units._c**2 * 4.0 * math.pi * units._eps0)
    * (units.Debye * units._e) ** 2 / units._amu / 1.0e3
)

#: hbar in eV per sqrt(eV/(Å^2 amu)): h*nu (eV) = HBAR_EV * sqrt(lambda) for an eigenvalue lambda of the
#: mass-weighted Hessian in eV/(Å^2 amu) (the factor of ASE's Vibrations).
HBAR_EV: float = units._hbar * 1e10 / math.sqrt(units._e * units._amu)

#: 1 e^2/amu (a dipole derivative in e, squared, per amu) in km/mol (1 e = 1/Debye D/Å; about 974.9).
KM_MOL_PER_E2_AMU: float = KM_MOL_PER_D2_A2_AMU / units.Debye**2

#: speed of light in cm/fs: wavenumber (cm^-1) = frequency (1/fs) / this.
SPEED_OF_LIGHT_CM_PER_FS: float = units._c * 1.0e2 * 1.0e-15

#: one femtosecond in ASE time units (Å sqrt(amu/eV)).
FS_IN_ASE_TIME: float = units.fs

#: factor that turns a dipole in the named unit into e·Å.
DIPOLE_UNIT_TO_EA: dict[str, float] = {
    "au": units.Bohr,      # e·Bohr (i-PI, atomic units)
    "eA": 1.0,             # e·Å (ASE)
    "debye": units.Debye,  # Debye
}

#: Avogadro's number (1/mol).
AVOGADRO: float = units._Nav

#: one atomic mass unit in grams.
AMU_IN_G: float = units._amu * 1.0e3

#: wavenumber (cm^-1) <-> energy (eV): E = wavenumber * EV_PER_INVCM.
EV_PER_INVCM: float = units.invcm


def dipole_unit_factor(unit: str) -> float:
    """Factor to e·Å for ``unit`` in ``au`` (e·Bohr), ``eA``, ``debye``; ValueError naming the choices."""
    try:
        return DIPOLE_UNIT_TO_EA[unit]
    except KeyError:
        raise ValueError(
            f"unknown dipole unit {unit!r}; choose from {', '.join(DIPOLE_UNIT_TO_EA)}"
        ) from None
