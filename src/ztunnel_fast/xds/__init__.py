"""Configuration sources for the proxy state: the local config file (local.py) and istiod over
delta xDS (convert.py: Istio's messages <-> models; delta.py: the sans-IO protocol core;
client.py: the gRPC stream).

Every source hands typed changes to the one StateStore (state/store.py); none hands out partially
validated objects: a resource is either converted whole or rejected with its name and reason.
"""
