"""The C++ loader (cpp), built against the installed torch: frozen TorchScript and AOTInductor from C++
reproduce the eager references within the manifest's tolerance, with no pickle on the way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import AOTI_MODEL
from torchship.cpp.tensor_io import build_cpp, read_tsio, time_cpp, verify_cpp, write_tsio
from torchship.export.exporter import ModelExport


@pytest.fixture(scope="session")
def cpp_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cpp(tmp_path_factory.mktemp("build_cpp"))


def test_tsio_round_trip(tmp_path: Path) -> None:
    tensors = [
        ("a", torch.randn(2, 3)),
        ("b", torch.arange(5, dtype=torch.int64)),
        ("c", torch.tensor([True, False])),
        ("d", torch.empty(0, 4)),
    ]
    write_tsio(tmp_path / "t.tsio", tensors)
    back = read_tsio(tmp_path / "t.tsio")
    assert [n for n, _ in back] == ["a", "b", "c", "d"]
    for (_, want), (_, got) in zip(tensors, back, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simple_cnn", "dynamic_router", "seq_decoder", "process_outputs"])
def test_cpp_reproduces_eager(cpp_binary: Path, zoo_export: dict[str, ModelExport], name: str) -> None:
    rows = verify_cpp(cpp_binary, zoo_export[name].model_dir)
    formats = {r.format for r in rows}
    assert formats == ({"torchscript", "aoti"} if name == AOTI_MODEL else {"torchscript"})
    assert len(rows) == len(formats) * 4  # every reference batch
    failed = [r for r in rows if not r.passed]
    assert not failed, failed


@pytest.mark.slow
def test_cpp_times_each_case_of_both_formats(cpp_binary: Path, zoo_export: dict[str, ModelExport]) -> None:
    """What `make bench` reads for its C++ rows: one p50 per case, from the same program that passes parity."""
    model_dir = zoo_export[AOTI_MODEL].model_dir
    cases = [(torch.randn(1, 3, 32, 32),), (torch.randn(4, 3, 32, 32),)]
    for fmt, file in (("torchscript", "model.torchscript.pt"), ("aoti", "model.aoti.pt2")):
        times = time_cpp(cpp_binary, model_dir / file, fmt, cases, repeat=3)
        assert len(times) == 2 and all(ms > 0 for ms in times), (fmt, times)
