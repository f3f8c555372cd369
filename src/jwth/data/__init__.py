"""Tile data sets: a folder with a labels.csv, read and validated."""

from jwth.data.tiles import TileDataset, TileTable, check_tiles, load_tile, read_labels

__all__ = ["TileDataset", "TileTable", "check_tiles", "load_tile", "read_labels"]
