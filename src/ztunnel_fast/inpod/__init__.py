"""In-pod mode (Istio >= 1.21): istio-cni hands each pod's network namespace to ztunnel-fast over
ZDS, and ztunnel-fast serves that pod from listeners bound inside its namespace.

Split as ztunnel's `inpod/`: `protocol` (datagrams and fds in, typed messages out; no sockets),
`statemanager` (which pods exist, snapshot, pending, readiness, metrics; no sockets),
`workloadmanager` (the ZDS connection: connect, retry, ack), `netns` (entering a pod's namespace)
and `podproxy` (one pod's listeners on the shared control loop and engine).
"""
