"""Test doubles for the peers that cannot run here (istio-cni, istiod, kube-apiserver).  They speak
the real protocols, and the demo uses them the same way the tests do."""
