"""Traffic redirection to ztunnel-fast: iptables (python-iptables), ipset, policy routing, pod
selection.

Layout: `rules` builds the rules as data (pure); `selection` decides which pods are ambient (pure);
`iptables`, `ipset`, `routes` apply them in the current network namespace; `install` orders the
steps; `nsenter` moves a process into a named namespace; `cli` is `ztunnel-fast redirect`.
"""
