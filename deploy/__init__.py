"""What ships to or runs in a cluster: the Ray Serve app, the pods' readiness probe, the Kubernetes tree (k8s/),
its offline sync/check and the parity-gated rollout."""
