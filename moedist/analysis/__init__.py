"""Routing analysis: routing signatures and task-aware expert pre-selection."""
