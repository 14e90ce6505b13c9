"""Counting electrons: thresholds (fixed or calibrated from the data) and the compiled kernels
that find events in frames, in sectors on the stream and in raw files offline."""
