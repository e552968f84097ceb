"""Top layer: the `coxmoe` command line, plots, and (later) sweeps and the paper's figures."""
