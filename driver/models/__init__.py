"""The neural networks, as a composition of small modules with explicit units:

- :mod:`.geometry`: padded batches of clusters and their pair geometry (Å).
- :mod:`.radial`: cosine cutoff and Gaussian radial basis.
- :mod:`.gaussian_moments`: the Gaussian-moment descriptor (360 rotation invariants by default).
- :mod:`.layers`: linear layers whose weights are stacked over committee members.
- :mod:`.energy_model`: GM-NN atomic energies (eV), summed to the total energy; forces by autograd.
- :mod:`.dipole_model`: SchNet-style environment-dependent atomic charges (e) and the dipole (e·Å).
- :mod:`.committee`: K energy members and J dipole members evaluated in one batched pass, with
  calibrated disagreement, saving and loading.
"""
