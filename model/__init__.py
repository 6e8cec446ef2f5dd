"""Client side: expert math, router and MoE layers (pure torch: experts.py, router.py, local_moe.py),
and the swarm client (expert_client.py, directory.py, replicas.py, dispatcher.py, remote_moe.py)."""

import moeswarm.protocol  # noqa: F401  (sets hivemind's sharing strategy before hivemind loads)
