"""nanosil's active-learning side: reference labels (ORCA, PySCF, GFN2-xTB behind one interface),
starting structures, initial data (normal modes + farthest point sampling), the active-learning loop
that runs i-PI + `nanosil-driver` in parallel and retrains the committee, and production IR campaigns.
"""
