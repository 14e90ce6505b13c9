"""The ground floor: facts and types every part of stemstream shares (detector geometry, the
configuration, the scan spec, thresholds, the version). Imports nothing of ours from above."""
