"""Preprocessing of raw images to template space (t1-linear, pet-linear) and its quality control."""
