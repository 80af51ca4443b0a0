"""nmt: neural machine translation toolkit (prepare, train, translate, evaluate)."""

__version__ = "0.1.0"
