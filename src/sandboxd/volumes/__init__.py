"""Volumes: persistent file trees that outlive sandboxes (store.py), and their files (content.py)."""
