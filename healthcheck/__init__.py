"""Standard-library checker for the sidecar's /health: Docker HEALTHCHECK, Nagios/Icinga, cron monitors."""
