"""Scripts run by :mod:`companion.experiments.history`, one interpreter per
release (``python -m companion.experiments.history_probes.<name>``).

Each imports whichever release ``PYTHONPATH`` puts first, so it uses only
the API common to all of them, and prints one JSON object on its last line.
"""
