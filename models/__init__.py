"""The model zoo: the seed's models, each with the ModelSpec that export, serving and verify read."""

from __future__ import annotations

from torchship.models import dynamic_router, process_outputs, seq_decoder, simple_cnn
from torchship.spec import ModelSpec

#: Every model that ships with torchship, by name, in export order.
ZOO: dict[str, ModelSpec] = {
    spec.name: spec for spec in (simple_cnn.SPEC, dynamic_router.SPEC, seq_decoder.SPEC, process_outputs.SPEC)
}
