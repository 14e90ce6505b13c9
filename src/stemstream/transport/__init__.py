"""How roles talk: msgpack maps, request/reply clients, data-path sockets, CURVE, shared memory
and free ports. Ground floor with core/: imports nothing of ours from above."""
