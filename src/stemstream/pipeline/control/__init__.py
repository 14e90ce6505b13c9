"""Control: the scan lifecycle service (scan specs, calibration, failover, role status)."""
