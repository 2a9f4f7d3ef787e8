"""Experiment lists for ``python main.py --config configs/<list>.py``; :mod:`configs.base` holds the
protocols they share."""
