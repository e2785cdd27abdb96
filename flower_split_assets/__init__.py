"""Data files shipped with flower-split (Banking77, CC BY 4.0: ``banking77/LICENSE``).

A package of its own, outside ``flower_split``, so that a Flower app bundle cannot shadow it:
a FAB carries the ``flower_split`` sources and Flower puts the FAB's directory first on
``sys.path``, so a file looked up next to ``flower_split``'s modules would be looked up in
the FAB (which carries no data, ``fab-exclude`` in pyproject.toml). This package is excluded
from every FAB and always resolves to the installed copy; read it through
:func:`importlib.resources.files` (:data:`flower_split.data.datasets.PACKAGED_BANKING77`).
"""
