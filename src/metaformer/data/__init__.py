"""Data sets and transforms: images and labels, never models."""
