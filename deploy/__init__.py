"""Command line, config files, local swarm launcher and service files."""
