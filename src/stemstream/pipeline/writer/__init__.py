"""The writer: one counted file per scan, written while the scan runs; the live results."""
