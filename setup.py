"""Generates the gRPC stubs from proto/moeserve.proto whenever the package is built or installed
(wheel, sdist build, or `pip install -e .`), so generated code is never committed. It runs
before setup() because setuptools checks that every listed package exists before any build
command runs."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def generate_grpc_stubs() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject's build-system.requires)

    out = ROOT / "moeserve" / "grpc_gen"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from proto/moeserve.proto at build time; not committed."""\n')
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
            str(ROOT / "proto" / "moeserve.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/moeserve.proto")
    # protoc writes `import moeserve_pb2`; inside the package it must be relative.
    grpc_file = out / "moeserve_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import moeserve_pb2 as", "from . import moeserve_pb2 as"))


generate_grpc_stubs()
setup()
