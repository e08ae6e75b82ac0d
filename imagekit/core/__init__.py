"""Core: errors, logging, paths, crash-safe writes, the one command runner, version numbers."""
