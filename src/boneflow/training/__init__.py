"""Synthetic radiographs, data set adapters, MONAI training, evaluation and reports."""
