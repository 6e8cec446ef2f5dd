"""Request ids: one random prefix per client, then a counter (a uuid4 per call cost ~10 us)."""

import asyncio

from moeswarm.model.expert_client import ExpertClient


def test_request_ids_share_one_prefix_per_client_and_never_repeat():
    async def ids_of_two_clients():
        clients = [ExpertClient("127.0.0.1:1"), ExpertClient("127.0.0.1:1")]  # never connects: no call is made
        try:
            return [[next(client._request_ids) for _ in range(3)] for client in clients]
        finally:
            for client in clients:
                await client.close()

    first, second = asyncio.run(ids_of_two_clients())
    assert len({request_id.rsplit("-", 1)[0] for request_id in first}) == 1
    assert [request_id.rsplit("-", 1)[1] for request_id in first] == ["0", "1", "2"]
    assert first[0].rsplit("-", 1)[0] != second[0].rsplit("-", 1)[0]  # clients stay apart in the nodes' logs
