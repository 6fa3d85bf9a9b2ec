"""Logs (and, later, metrics) in the shapes Istio operators already grep and scrape."""
