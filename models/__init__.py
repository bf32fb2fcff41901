"""Models layer: the registry, LNLN, HRLF and the MSA metrics. Knows nothing of Ray."""
