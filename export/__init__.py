"""Export stage: eager models -> artifacts/<model>/ (frozen TorchScript, .pt2, AOTInductor), gated on parity."""
