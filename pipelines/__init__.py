"""Thin command-line entry points over ``core``; run them as ``python -m pipelines.<name> --help``."""
