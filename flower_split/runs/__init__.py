"""Runs above everything else: in-process training and inference, Flower simulations, comparisons, reports and plots."""
