"""The web dashboard at /dashboard: the page and its bundle (built from dashboard/ at the repository's top by
scripts/build-dashboard.sh into static/), and the terminal's WebSocket (terminal.py). Everything else the page
shows it asks the server's own API for, with the user's API key."""
