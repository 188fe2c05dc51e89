"""Pickers: each chooses one candidate from the weighted totals (one module per picker)."""
