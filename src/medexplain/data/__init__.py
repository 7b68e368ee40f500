"""Planted-evidence data on real anatomy (``docs/data.md``). The labels are planted, not diagnostic.

>>> from medexplain import data
>>> ds = data.chest_xray(n=200, size=64, seed=0)          # 2D, 1 channel, labels + nodule masks
>>> train, test = ds.split(0.8)
"""
from medexplain.data.dataset import PlantedDataset
from medexplain.data.planted import chest_xray, contrast_volumes, fundus, lesion_volumes

__all__ = ["PlantedDataset", "chest_xray", "contrast_volumes", "fundus", "lesion_volumes"]
