"""Datasets: image loading, pretraining sources, the generated shapes dataset, detection registration."""
