"""Python API: train in process from a :class:`RunConfig`, write results.json.

The public entry points of :mod:`flower_split.runs.local`, re-exported so user code has one
stable import path::

    from flower_split.runs.local import train, write_results
"""

from flower_split.runs.local import RESULTS_FILE, train, write_results

__all__ = ["RESULTS_FILE", "train", "write_results"]
