"""Build hook: generate the gRPC message modules from `datapin_sidecar/csi/proto/*.proto`.

Everything else about the build is in pyproject.toml; this file exists only because
setuptools has no declarative way to run a code generator. `build_py` runs for a wheel
(`pip install .`, the image) and for an editable install (`pip install -e .`, setup and CI)
alike, so both get `<name>_pb2.py` (and `<name>_pb2.pyi`, which mypy reads) written beside
each .proto inside the package, where the package's own imports find them. The generated
files are not committed (.gitignore): the .proto files are the source.

Only the message modules are generated, not `*_pb2_grpc.py`: `csi.rpc` registers its
handlers with grpc's generic API, typed against the messages, so the untyped service stubs are
never needed. protoc comes from grpcio-tools, a build requirement, with the well-known types
(`google/protobuf/*.proto`) it ships.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from grpc_tools import protoc  # a build requirement (pyproject.toml), not a runtime one
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: protoc's import root: the .proto files are named by their package path under it, so the
#: generated modules import each other as `datapin_sidecar.csi.proto.*` and register under
#: unique names in protobuf's global descriptor pool.
SOURCE_ROOT = ROOT / "sidecar"
PROTO_DIR = SOURCE_ROOT / "datapin_sidecar" / "csi" / "proto"


def generate_protos() -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    protos = sorted(p.relative_to(SOURCE_ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"setup.py: no .proto files in {PROTO_DIR}")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={SOURCE_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={SOURCE_ROOT}",
        f"--pyi_out={SOURCE_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"setup.py: protoc failed on {', '.join(protos)}")


class BuildPyWithProtos(build_py):
    """`build_py` that generates the message modules first, so they are part of the build."""

    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
