"""The node group: reassembles each frame from its 4 sectors, counts it, sends events on."""
