"""Model math: experts, routers, MoE layers. Pure torch: no grpc, asyncio or hivemind here."""
