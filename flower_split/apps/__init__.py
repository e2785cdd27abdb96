"""The Flower apps of the split protocol: one ClientApp (tenant) and one ServerApp (cloud).

Both ask the security-backend registry (:mod:`flower_split.backends`) for what a level
supplies: the ClientApp registers every backend's handlers, the ServerApp builds the cloud's
strategy of the run's level. ``flwr run .`` uses ``client_app:app`` and ``server_app:app``.
"""
