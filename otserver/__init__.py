"""otserver: a self-hosted events engine speaking Opentracker's raw-URL events API."""

__version__ = "0.1.0"
