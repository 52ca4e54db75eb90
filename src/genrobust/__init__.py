"""genrobust: make image classifiers robust with generated data, and measure whether they are."""
__version__ = "0.1.0"
