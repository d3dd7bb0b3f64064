"""The control plane: E2B's REST API (v1 and v2 paths) over the sandbox manager."""
