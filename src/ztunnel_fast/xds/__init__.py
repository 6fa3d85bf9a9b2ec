"""Configuration sources for the proxy state: the local config file now, delta ADS later.

Each source produces complete, validated snapshots (see state.store.ProxyState); none hands out
partially applied configuration.
"""
