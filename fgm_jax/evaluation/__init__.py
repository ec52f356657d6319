"""Evaluation: Fréchet distances, small-data metrics, FID, sample grids."""
