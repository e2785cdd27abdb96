"""Python API: train in process from a :class:`RunConfig`, write results.json, classify with the result.

The public entry points of :mod:`flower_split.runs.local` and :mod:`flower_split.runs.predict`,
re-exported so user code has one stable import path::

    from flower_split.api import SplitClassifier, train
    train(config, state_dir="out/state")
    SplitClassifier.load("out").predict(["my card was declined"])
"""

from flower_split.runs.local import RESULTS_FILE, train, write_results
from flower_split.runs.predict import Prediction, SplitClassifier
from flower_split.state import StateError

__all__ = ["RESULTS_FILE", "Prediction", "SplitClassifier", "StateError", "train", "write_results"]
