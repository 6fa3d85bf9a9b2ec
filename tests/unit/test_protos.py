"""The committed generated code matches the .proto files (regenerated into a temp dir and diffed)."""

from pathlib import Path

from ztunnel_fast.protos import generate


def test_generated_code_is_current(tmp_path: Path):
    protos = generate.proto_files()
    assert protos, "no .proto files found"
    written = generate.generate(tmp_path)
    committed = sorted(generate.HERE.glob("*_pb2*.py"))
    assert [p.name for p in written] == [p.name for p in committed]
    for fresh in written:
        assert fresh.read_text() == (generate.HERE / fresh.name).read_text(), (
            f"{fresh.name} is stale: run python -m ztunnel_fast.protos.generate")
