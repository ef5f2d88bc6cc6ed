"""The agent's RPC server: topic ``compute``, server = this host's name."""

from __future__ import annotations

import oslo_messaging as messaging

from compute_agent import rpc


def get_server(conf, transport: messaging.Transport, endpoint) -> messaging.RPCServer:
    target = messaging.Target(topic=rpc.TOPIC, server=conf.host)
    # threading executor: each request runs in a pool thread, so operations on
    # different instances proceed in parallel (the manager serialises per
    # instance).
    return messaging.get_rpc_server(transport, target, [endpoint], executor="threading",
                                    serializer=rpc.ContextSerializer())
