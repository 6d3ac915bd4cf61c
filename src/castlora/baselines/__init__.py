"""Data-free baselines a CAST transfer is compared with."""
