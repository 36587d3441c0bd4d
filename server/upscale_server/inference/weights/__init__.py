"""Weights: the model manifest, provisioning weight files, reading them, and converting the ncnn ones."""
