"""TorchServe handlers and the wire codec; torch + stdlib only (they travel inside every .mar)."""
