"""Subcommands beyond LightningCLI's own; each depends on the application (``app.py``),
never the reverse."""
