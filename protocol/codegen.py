"""Regenerate protocol/expert_pb2*.py from expert.proto: `python protocol/codegen.py` after editing it.

The import path is mapped to moeswarm/protocol so the generated gRPC module imports
`moeswarm.protocol.expert_pb2`, matching the installed package layout.
"""

import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ("expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    """Write the generated modules into out_dir; raise RuntimeError if protoc fails."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Imoeswarm/protocol={ROOT / 'protocol'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(ROOT / "protocol" / "expert.proto"),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on protocol/expert.proto")
        for name in GENERATED:
            shutil.copy(pathlib.Path(tmp) / "moeswarm" / "protocol" / name, out_dir / name)


if __name__ == "__main__":
    generate(ROOT / "protocol")
    print("regenerated", ", ".join(GENERATED), file=sys.stderr)
