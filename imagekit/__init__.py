"""imagekit: build and validate Linux VM images for Azure on one machine, without Azure."""

__version__ = "0.1.0"
