"""The public validation set: published measurements of offloading systems as data, and their simulation.

`points/*.yaml` hold end-to-end measurements with the system, model, workload and knobs as published
(`schema.py` checks them); `microbench.yaml` holds per-op microbenchmarks that set hardware constants
(`microbench.py` derives them); `run.py` simulates every point with its published knobs and with the policy's own
search; `coxmoe reproduce validation` draws the predicted-vs-measured figure and table.
"""
