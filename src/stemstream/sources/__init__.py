"""Frame sources: where detector frames come from (the detector simulator and its synthetic specimen)."""
