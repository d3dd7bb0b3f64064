"""The `sandboxd` command line."""
