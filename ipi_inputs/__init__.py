"""i-PI XML inputs (active-learning sampling, NVT and NVE production) and the function that fills their
placeholders, shared by the active-learning manager and the production runner."""
