"""How a pipeline is started: its checked config, one host (every role a local process), a scan
through control, Slurm/MPI batch jobs."""
