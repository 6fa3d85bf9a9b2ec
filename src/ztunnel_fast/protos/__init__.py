"""Istio's wire messages, written here from the published field numbers, and their Python code.

Role: the `.proto` files in this folder declare Istio's messages with Istio's package names,
message names, field numbers and enum values (type URLs such as
`type.googleapis.com/istio.workload.Address` follow from them); `*_pb2.py` / `*_pb2_grpc.py` are
generated from them by `python -m ztunnel_fast.protos.generate` and committed.

Invariants:
- The generated modules are never edited by hand; tests/unit/test_protos.py regenerates them into
  a temporary folder and fails on any difference, so a .proto change without regeneration fails.
- Every .proto here is self-contained apart from google/protobuf's well-known types, so the
  generated code imports nothing but `google.protobuf` (protoc's absolute imports never point at a
  top-level `istio` package that does not exist).
- Envoy's delta discovery messages are here cut down to ztunnel's fields (`discovery.proto`:
  Envoy's field numbers, a package of our own; the wire format is Envoy's, checked field by field
  against PyPI `xds-protos` in tests/unit/test_protos.py).  The fake istiod serves the ADS service
  with xds-protos' full messages (`envoy.service.discovery.v3`).
"""
