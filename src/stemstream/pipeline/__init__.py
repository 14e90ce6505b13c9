"""The roles of the streaming pipeline: producer, gateway, node group, writer, control."""
