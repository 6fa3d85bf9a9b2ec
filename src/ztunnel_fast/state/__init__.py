"""What ztunnel-fast knows about the mesh: workloads, services, policies; pure lookups only."""
