"""Report and evaluation helpers run by hand on finished results or saved models:
``python -m tools.<name>`` from the repository root."""
