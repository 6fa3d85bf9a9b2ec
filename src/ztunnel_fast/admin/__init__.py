"""Operator endpoints: admin (localhost:15000), stats (15020) and readiness (15021)."""
