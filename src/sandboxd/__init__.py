"""sandboxd: a self-hosted runtime for AI agents' code that speaks the E2B wire protocol."""

__version__ = "0.1.0"
