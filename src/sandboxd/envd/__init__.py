"""envd: the in-sandbox daemon protocol (Connect RPC process service, /health, /envs), served host-side."""
