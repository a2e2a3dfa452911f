"""The progress-line format, for the control plane (which reaches workers only through jobs)."""

from workers.progress import PREFIX, format_progress, parse_progress

__all__ = ["PREFIX", "format_progress", "parse_progress"]
