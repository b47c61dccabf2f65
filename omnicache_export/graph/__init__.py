"""The graph side: analysis, input roles, FLOP estimate, model I/O, the split job, synthetic inputs."""
