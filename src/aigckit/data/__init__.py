"""Datasets for the image models: Fashion-MNIST (our own IDX reader) and image folders, located by fsspec URLs."""

from aigckit.data.images import ImageDataset, load_dataset

__all__ = ["ImageDataset", "load_dataset"]
