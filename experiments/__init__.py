"""Experiment drivers that run the library's entry points end to end (``python -m experiments.<name>``)."""
