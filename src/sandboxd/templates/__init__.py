"""Templates: the root filesystems sandboxes start from, built from Debian packages and cached on disk."""

from sandboxd.templates.store import Template, TemplateError, TemplateStore

__all__ = ["Template", "TemplateError", "TemplateStore"]
