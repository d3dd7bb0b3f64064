"""Routing: one listening port; `E2b-Sandbox-Id` + `E2b-Sandbox-Port` pick a sandbox's service, else control plane."""
