"""Generate the Python modules of moedist's .proto files (run by `make protos`).

    python protos/generate.py [--out DIR]    # default: the repository root

protos/moedist/v1/control.proto -> moedist/control/v1/control_pb2.py, control_pb2.pyi,
control_pb2_grpc.py. The proto package stays moedist.v1; the import path is mapped to
moedist/control/v1 (protoc's -I VIRTUAL=DIR) so that the generated modules import each
other as moedist.control.v1.*. Needs grpcio-tools (the dev extra pins the version the
committed files were generated with: other versions emit other code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (import path inside the package, folder of the .proto files, files)
PROTOS = [("moedist/control/v1", ROOT / "protos" / "moedist" / "v1", ["control.proto"])]


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into `out`; returns the files written."""
    from importlib import resources

    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    written: list[Path] = []
    for virtual, folder, files in PROTOS:
        (out / virtual).mkdir(parents=True, exist_ok=True)
        for name in files:
            args = ["grpc_tools.protoc", f"-I{virtual}={folder}", f"-I{well_known}", f"--python_out={out}",
                    f"--pyi_out={out}", f"--grpc_python_out={out}", str(folder / name)]  # fmt: skip
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {folder / name}")
            stem = name.removesuffix(".proto")
            written += [out / virtual / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    for path in generate(p.parse_args(argv).out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
