"""The C++ loader's side of the house: TSIO tensor files (no pickle), building it, and its parity with eager.

TSIO: b"TSIO", uint32 version 1, uint32 count, then per tensor: uint32 name length, name, uint32 dtype code,
uint32 ndim, int64 dims, uint64 nbytes, raw little-endian data (see cpp/tensor_io.h).
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from torchship.errors import TorchshipError
from torchship.export.reference import load_reference
from torchship.handlers.names import REFERENCE_FILE
from torchship.manifest import FORMAT_FILES, read_manifest
from torchship.parity import compare_all
from torchship.spec import Tolerance

#: The loader's C++ sources and CMakeLists.txt travel with the package (package data).
CPP_SOURCE = Path(str(resources.files("torchship.cpp")))
#: Where `make cpp` / build_cpp() builds by default: the user's cache, one folder per torch version (the binary links
#: the installed libtorch). TORCHSHIP_CPP_BUILD sets another.
DEFAULT_BUILD = Path(
    os.environ.get("TORCHSHIP_CPP_BUILD")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torchship" / f"cpp-torch{torch.__version__}"
)
BINARY_NAME = "torchship_cpp"
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.int64: 3,
    torch.int32: 4,
    torch.bool: 5,
    torch.uint8: 6,
}
DTYPES = {v: k for k, v in DTYPE_CODES.items()}
#: Which artifact each C++ mode loads.
CPP_MODES = {"torchscript": "torchscript", "aoti": "aoti"}


def write_tsio(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    with path.open("wb") as f:
        f.write(b"TSIO" + struct.pack("<II", 1, len(tensors)))
        for name, tensor in tensors:
            t = tensor.detach().cpu().contiguous()
            raw = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
            encoded = name.encode("utf-8")
            f.write(struct.pack("<I", len(encoded)) + encoded)
            f.write(struct.pack("<II", DTYPE_CODES[t.dtype], t.dim()))
            f.write(struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(struct.pack("<Q", len(raw)) + raw)


def read_tsio(path: Path) -> list[tuple[str, torch.Tensor]]:
    data = path.read_bytes()
    if data[:4] != b"TSIO":
        raise TorchshipError(f"{path} is not a TSIO file")
    version, count = struct.unpack_from("<II", data, 4)
    if version != 1:
        raise TorchshipError(f"{path}: TSIO version {version} is not supported")
    offset = 12
    out: list[tuple[str, torch.Tensor]] = []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, offset)
        name = data[offset + 4 : offset + 4 + n].decode("utf-8")
        offset += 4 + n
        code, ndim = struct.unpack_from("<II", data, offset)
        offset += 8
        dims = list(struct.unpack_from(f"<{ndim}q", data, offset))
        offset += 8 * ndim
        (nbytes,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        raw = bytearray(data[offset : offset + nbytes])
        offset += nbytes
        flat = torch.frombuffer(raw, dtype=DTYPES[code]) if nbytes else torch.empty(0, dtype=DTYPES[code])
        out.append((name, flat.reshape(dims)))
    return out


def build_cpp(build_dir: Path = DEFAULT_BUILD) -> Path:
    """Configure and build cpp against the installed torch; returns the binary."""
    prefix = torch.utils.cmake_prefix_path
    steps = [
        ["cmake", "-S", str(CPP_SOURCE), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build_dir), "-j2"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode != 0:
            raise TorchshipError(
                f"{' '.join(cmd[:2])} failed; needs cmake and a C++17 compiler:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    return build_dir / BINARY_NAME


@dataclass(frozen=True)
class CppRow:
    model: str
    format: str
    batch_size: int
    max_abs: float
    max_rel: float
    passed: bool
    reason: str


def verify_cpp(binary: Path, model_dir: Path) -> list[CppRow]:
    """Run every reference case of every C++-loadable format of one exported model through the C++ program."""
    manifest = read_manifest(model_dir)
    cases = load_reference(model_dir / REFERENCE_FILE)
    input_names = [t.name for t in manifest.inputs]
    output_names = [t.name for t in manifest.outputs]
    rows: list[CppRow] = []
    for fmt in manifest.usable_formats():
        if fmt not in CPP_MODES:
            continue
        tol = Tolerance(manifest.tolerance[fmt].atol, manifest.tolerance[fmt].rtol)
        with tempfile.TemporaryDirectory(prefix="torchship-cpp-") as tmp:
            inputs, outputs = Path(tmp) / "in.tsio", Path(tmp) / "out.tsio"
            write_tsio(inputs, [(f"{c}/{n}", case.inputs[n]) for c, case in enumerate(cases) for n in input_names])
            cmd = [str(binary), CPP_MODES[fmt], str(model_dir / FORMAT_FILES[fmt]), str(inputs), str(outputs)]
            proc = subprocess.run(
                [*cmd, "--inputs-per-case", str(len(input_names))], capture_output=True, text=True, check=False, timeout=600
            )
            if proc.returncode != 0:
                raise TorchshipError(f"{manifest.name} {fmt}: the C++ loader failed: {proc.stderr.strip()}")
            got = dict(read_tsio(outputs))
        for c, case in enumerate(cases):
            actual = tuple(got[f"{c}/{i}"] for i in range(len(output_names)))
            check = compare_all(actual, case.expected_from(output_names), tol)
            rows.append(CppRow(manifest.name, fmt, case.batch_size, check.max_abs, check.max_rel, check.passed, check.reason))
    return rows


def time_cpp(binary: Path, artifact: Path, fmt: str, cases: list[tuple[torch.Tensor, ...]], *, repeat: int) -> list[float]:
    """p50 milliseconds of each case's forward pass in the C++ program (`--repeat` runs after a first, untimed one)."""
    with tempfile.TemporaryDirectory(prefix="torchship-cpp-") as tmp:
        inputs, outputs = Path(tmp) / "in.tsio", Path(tmp) / "out.tsio"
        write_tsio(inputs, [(f"{c}/{i}", t) for c, args in enumerate(cases) for i, t in enumerate(args)])
        cmd = [str(binary), CPP_MODES[fmt], str(artifact), str(inputs), str(outputs),
               "--inputs-per-case", str(len(cases[0])), "--repeat", str(repeat)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode != 0:
            raise TorchshipError(f"{artifact.name}: the C++ loader failed: {proc.stderr.strip()}")
    times = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("case ")]
    if len(times) != len(cases):
        raise TorchshipError(f"{artifact.name}: the C++ loader timed {len(times)} of {len(cases)} cases:\n{proc.stdout}")
    return times
