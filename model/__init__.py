"""Model math: experts, routers, MoE layers. Pure torch: no grpc, asyncio or hivemind here."""

import moeswarm.protocol  # noqa: F401  (sets hivemind's sharing strategy before hivemind loads)
