"""Everything that talks to TorchServe: the launcher, its Java, the OIP agent, the readiness probe and the drain."""
