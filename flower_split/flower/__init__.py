"""Flower wiring: message contract, record codecs, strategies, ClientApp and ServerApp."""
