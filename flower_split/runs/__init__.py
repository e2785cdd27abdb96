"""Runs above everything else: Flower simulations, comparisons, reports and plots."""
