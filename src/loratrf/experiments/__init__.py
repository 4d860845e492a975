"""Runnable experiments built on loratrf's public API (`python -m loratrf.experiments.<name>`)."""
