"""Command line, config files, local swarm launcher and service files."""

import moeswarm.protocol  # noqa: F401  (sets hivemind's sharing strategy before hivemind loads)
