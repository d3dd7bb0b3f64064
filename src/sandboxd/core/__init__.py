"""The sandbox manager: lifecycle of sandboxes (create, timeouts, pause, kill, re-adoption) over a runtime."""
