"""Test doubles of what cannot run here (istiod, istio-cni, ...), speaking the real protocols.

They live in the package, not under tests/, because the demo runs the same code path."""
