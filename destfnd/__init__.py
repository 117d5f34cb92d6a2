"""destfnd: self-hosted Segment destination functions."""

__version__ = "0.1.0"
