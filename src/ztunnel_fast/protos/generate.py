"""Regenerate the Python modules for every .proto in this folder (`python -m ztunnel_fast.protos.generate`).

grpcio-tools' bundled protoc compiles each `<name>.proto` to `<name>_pb2.py` (and
`<name>_pb2_grpc.py` for files that declare a service) next to it.  `generate(out_dir)` writes
somewhere else, which is how the test checks that the committed code is current.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def generate(out_dir: Path = HERE) -> list[Path]:
    """Compile every .proto here into out_dir; returns the files written.  Raises RuntimeError
    with protoc's exit status when compilation fails."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in proto_files():
        args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}", str(proto)]
        if "service " in proto.read_text():
            args.insert(-1, f"--grpc_python_out={out_dir}")
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto.name} (exit {status})")
    for stub in out_dir.glob("*_pb2_grpc.py"):
        _relative_imports(stub)
    return sorted(out_dir.glob("*_pb2*.py"))


# grpc_python_out imports its message module as a top-level name (`import ca_pb2 as ca__pb2`),
# which only resolves when this folder is on sys.path; make it a package-relative import.
_TOP_LEVEL_PB2 = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def _relative_imports(stub: Path) -> None:
    text = stub.read_text()
    fixed = _TOP_LEVEL_PB2.sub(r"from . import \1 as \2", text)
    if fixed != text:
        stub.write_text(fixed)


def main() -> int:
    for path in generate():
        print(path.relative_to(HERE.parent.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
