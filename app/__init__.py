"""backup-sidecar: streamed, checksummed PostgreSQL backups beside an application."""

__version__ = "0.1.0"
