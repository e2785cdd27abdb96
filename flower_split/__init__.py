"""flower-split: split learning for Flower.

``__version__`` is the package's version (pyproject.toml's, checked by
tests/flower/test_tenant_worker.py); it travels in the code of every run's FAB, so a tenant
worker can refuse a run whose code is another version than its own
(:mod:`flower_split.flower.worker_link`).
"""

__version__ = "0.1.0"
