"""Repository tools, not installed with comkd: the evidence runs, recipe sweeps and the results
page (``python -m experiments.results_page collect|page``)."""
