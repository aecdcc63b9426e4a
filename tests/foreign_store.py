"""Archives torchship did not build: made with the stock torch-model-archiver in the styles of TorchServe's own examples
(tests/fixtures/foreign/ holds their handlers and model files), plus broken ones, and a `torchship migrate` request
folder for them. Weights come from fixed seeds; nothing is downloaded."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchship.archive.build import archiver

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "foreign"
#: The four working styles the migration must carry over unchanged.
GOOD = ("batched", "image", "scale", "text")
#: TorchServe's text_classifier splits on whitespace and punctuation: these words and their bigrams are its vocabulary.
TEXT_REQUESTS = ("good movie", "bad plot and bad acting", "a good plot", "acting")
TEXT_LABELS = {"0": "negative", "1": "neutral", "2": "positive"}


def archive_foreign(
    store: Path,
    name: str,
    handler: str,
    *,
    work: Path,
    version: str = "1.0",
    model_file: Path | None = None,
    serialized: Path | None = None,
    extra: list[Path] | None = None,
    config: dict[str, object] | None = None,
    requirements: str | None = None,
) -> Path:
    """One archive by the stock torch-model-archiver into `store` (made if missing); `work` holds its inputs."""
    store.mkdir(parents=True, exist_ok=True)
    store, work = store.resolve(), work.resolve()
    cmd = [archiver(), "--model-name", name, "--version", version, "--handler", handler, "--export-path", str(store), "-f"]
    if model_file:
        cmd += ["--model-file", str(model_file.resolve())]
    if serialized:
        cmd += ["--serialized-file", str(serialized.resolve())]
    if extra:
        cmd += ["--extra-files", ",".join(str(p.resolve()) for p in extra)]
    if config is not None:
        path = work / f"{name}-config.yaml"
        path.write_text("".join(f"{k}: {v}\n" for k, v in config.items()), encoding="utf-8")
        cmd += ["--config-file", str(path)]
    if requirements is not None:
        path = work / f"{name}-requirements.txt"
        path.write_text(requirements, encoding="utf-8")
        cmd += ["--requirements-file", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed for {name}: {proc.stderr or proc.stdout}")
    return store / f"{name}.mar"


def _state_dict(module: nn.Module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


def _load_class(path: Path, name: str) -> type[nn.Module]:
    scope: dict[str, object] = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), scope)  # the fixture's own model file
    cls = scope[name]
    assert isinstance(cls, type)
    return cls


def _vocab() -> dict[str, int]:
    tokens: list[str] = []
    for line in TEXT_REQUESTS:
        words = line.split()
        tokens += words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    return {token: i for i, token in enumerate(sorted(set(tokens)))}


def build_good(store: Path, work: Path, *, scale_handler: Path | None = None) -> list[Path]:
    """The four archives: an image classifier on an eager model + state_dict, a batched TorchScript handler with a
    version and a model-config.yaml, a module-level `handle` reading a header, TorchServe's text_classifier by name.
    `scale_handler` swaps the scale archive's handler file (a changed handler between two builds)."""
    store.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    cnn = _load_class(FIXTURES / "tiny_cnn.py", "TinyCNN")()
    names = work / "index_to_name.json"
    names.write_text(json.dumps({str(i): f"class-{i}" for i in range(5)}), encoding="utf-8")
    image = archive_foreign(
        store, "image", str(FIXTURES / "image_handler.py"), work=work, model_file=FIXTURES / "tiny_cnn.py",
        serialized=_state_dict(cnn, work / "tiny_cnn.pth"), extra=[names],
    )  # fmt: skip
    torch.manual_seed(11)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(6, 4), nn.Tanh()))
    scripted.save(str(work / "batched.pt"))
    batched = archive_foreign(
        store, "batched", str(FIXTURES / "batched_handler.py"), work=work, version="2.0", serialized=work / "batched.pt",
        config={"batchSize": 4, "maxBatchDelay": 200, "minWorkers": 1, "maxWorkers": 1},
    )  # fmt: skip
    scale = archive_foreign(store, "scale", str(scale_handler or FIXTURES / "scale_handler.py"), work=work)
    torch.manual_seed(13)
    text_net = _load_class(FIXTURES / "text_net.py", "TextNet")()
    vocab_dir = work / "text"
    vocab_dir.mkdir(exist_ok=True)
    torch.save(_vocab(), vocab_dir / "source_vocab.pt")
    (vocab_dir / "index_to_name.json").write_text(json.dumps(TEXT_LABELS), encoding="utf-8")
    text = archive_foreign(
        store, "text", "text_classifier", work=work, model_file=FIXTURES / "text_net.py",
        serialized=_state_dict(text_net, work / "text_net.pth"),
        extra=[vocab_dir / "source_vocab.pt", vocab_dir / "index_to_name.json"],
    )  # fmt: skip
    return [batched, image, scale, text]


def _png(seed: int) -> bytes:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (20, 20, 3), generator=gen, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_requests(root: Path) -> Path:
    """`torchship migrate --requests` for build_good's store: one folder per model, one file per request body, headers
    beside it in `<file>.headers.json`."""

    def put(model: str, name: str, body: bytes, headers: dict[str, str]) -> None:
        folder = root / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
        (folder / f"{name}.headers.json").write_text(json.dumps(headers), encoding="utf-8")

    for i in range(3):
        put("image", f"cat{i}.png", _png(i), {"Content-Type": "image/png"})
    gen = torch.Generator().manual_seed(5)
    for i in range(6):
        values = [round(float(v), 4) for v in torch.randn(6, generator=gen)]
        put("batched", f"row{i}.json", json.dumps({"values": values}).encode(), {"Content-Type": "application/json"})
    put("scale", "double.txt", b"1 2.5 -3", {"Content-Type": "text/plain", "X-Scale": "2"})
    put("scale", "plain.txt", b"4 5", {"Content-Type": "text/plain"})
    put("scale", "negative.txt", b"1", {"Content-Type": "text/plain", "X-Scale": "-1"})
    for i, line in enumerate(TEXT_REQUESTS):
        put("text", f"review{i}.txt", line.encode(), {"Content-Type": "text/plain"})
    return root


def _rewrite(mar: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Edit a foreign archive's entries in place, as a hand edit would (no torchship listing added)."""
    with zipfile.ZipFile(mar) as z:
        entries = {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
    edit(entries)
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)


def build_broken(store: Path, work: Path) -> dict[str, str]:
    """Broken foreign archives, each with the cause its refusal must name: {endpoint: words the cause contains}."""
    store.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    archive_foreign(store, "raises", str(FIXTURES / "raising_handler.py"), work=work)
    torch.manual_seed(3)
    scripted = torch.jit.script(nn.Linear(2, 2))
    scripted.save(str(work / "linear.pt"))
    missing = archive_foreign(store, "missing", str(FIXTURES / "batched_handler.py"), work=work, serialized=work / "linear.pt")
    _rewrite(missing, lambda entries: entries.pop("linear.pt"))
    nohandler = archive_foreign(
        store, "nohandler", str(FIXTURES / "batched_handler.py"), work=work, serialized=work / "linear.pt"
    )

    def drop_handler(entries: dict[str, bytes]) -> None:
        doc = json.loads(entries["MAR-INF/MANIFEST.json"])
        doc["model"].pop("handler")
        entries["MAR-INF/MANIFEST.json"] = json.dumps(doc, indent=2).encode()

    _rewrite(nohandler, drop_handler)
    archive_foreign(
        store, "needs", str(FIXTURES / "batched_handler.py"), work=work, serialized=work / "linear.pt",
        requirements="torchship-no-such-package==1.0\n",
    )  # fmt: skip
    archive_foreign(store, "vision", "image_classifier", work=work, serialized=work / "linear.pt")
    return {
        "raises": "the label file is corrupt",
        "missing": "linear.pt",
        "nohandler": "no handler",
        "needs": "torchship-no-such-package",
        "vision": "torchvision",
    }
