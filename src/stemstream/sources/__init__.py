"""Where detector frames come from: the producers' sources of each module's sector records.

- The detector simulator (``sources.simulator``, its parts in ``detector_simulator``,
  ``receiver_files``, ``detector_response``, ``electrons``, ``render``, ``random_streams``, and
  the synthetic specimen in ``specimen``): frames a user would mistake for the 4D Camera's, whole
  (with the true electron landing pixels), as one module's sectors or raw records, or written to a
  directory as the receivers write a scan.
- ``sources.modules``: what a producer streams, block by routing block, for one module:
  ``SimulatedModule`` (the simulator, live, at a set frame rate) and ``ReplayModule`` (a scan's
  raw files re-read in frame order). Both are ``sources.protocol.ModuleSource``.
"""
