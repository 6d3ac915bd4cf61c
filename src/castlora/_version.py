"""castlora's version, in a leaf module: nothing imports back up through the package to read it."""

__version__ = "0.1.0"
