"""LUMEN synthetic-data augmentation pipeline: the library (no Prefect imports here)."""

__version__ = "0.1.0"
