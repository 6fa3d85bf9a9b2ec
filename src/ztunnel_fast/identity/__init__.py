"""Workload identities (SPIFFE), the local CA and the certificate manager."""
