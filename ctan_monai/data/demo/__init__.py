"""Synthetic demo datasets, written in the real on-disk format of each dataset (clearly labelled synthetic)."""
