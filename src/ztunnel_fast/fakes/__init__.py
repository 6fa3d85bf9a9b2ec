"""Test doubles of what cannot run here (istiod, istio-cni), speaking the real protocols over
real transports; used by the tests and the demo, never by the product path."""
