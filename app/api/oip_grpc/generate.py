"""Regenerate the Python modules of ``open_inference_grpc.proto`` (messages, type stubs, the
service's stubs) with grpcio-tools: ``python -m app.api.oip_grpc.generate`` from the repository.

``--check`` writes nothing: it generates into a temporary folder and fails (exit 1) where the
vendored files differ, which ``tests/test_grpc_setup.py`` runs with the grpcio-tools that the test
extra pins (another protoc writes other files). The proto is named by its path from the
repository's root, so the generated service module imports the messages as
``app.api.oip_grpc.open_inference_grpc_pb2`` (a package-relative import, not a top-level one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
PROTO = HERE / "open_inference_grpc.proto"
GENERATED = ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2.pyi", "open_inference_grpc_pb2_grpc.py")
# tritonclient.grpc and the KServe SDK register messages of the same names (package ``inference``)
# in protobuf's default pool, and a second registration of a symbol fails the import: the
# messages go to a pool of their own, so that the server and those clients share one process
# (the tests, an application embedding both).
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "# equiserve: a descriptor pool of its own (app/api/oip_grpc/generate.py says why)\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools' own) on the proto into ``out``; the generated files' paths."""
    try:
        from grpc_tools import protoc
    except ModuleNotFoundError as exc:
        raise SystemExit("regenerating needs grpcio-tools: pip install grpcio-tools") from exc
    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    relative = PROTO.relative_to(ROOT)
    args = [
        "grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}",
        f"--grpc_python_out={out}", str(relative),
    ]  # fmt: skip
    import os

    cwd = Path.cwd()
    os.chdir(ROOT)  # protoc resolves the proto's path against the include folder
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    messages = out / relative.parent / GENERATED[0]
    text = messages.read_text()
    if text.count("DESCRIPTOR = " + DEFAULT_POOL) != 1:
        raise SystemExit(f"{messages.name}: protoc no longer writes {DEFAULT_POOL!r} once; update generate.py")
    messages.write_text(text.replace("DESCRIPTOR = " + DEFAULT_POOL, OWN_POOL))
    return [out / relative.parent / name for name in GENERATED]


def differences() -> list[str]:
    """The vendored files that differ from what this grpcio-tools generates (empty: none)."""
    with tempfile.TemporaryDirectory() as folder:
        fresh = generate(Path(folder))
        return [path.name for path in fresh if not (HERE / path.name).is_file() or
                (HERE / path.name).read_bytes() != path.read_bytes()]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.api.oip_grpc.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the vendored files differ")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences()
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m app.api.oip_grpc.generate", file=sys.stderr)
            return 1
        print("the generated modules are up to date")
        return 0
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
