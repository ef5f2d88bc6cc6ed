"""oslo.messaging wiring shared by the server (the agent) and the client."""

from __future__ import annotations

import oslo_messaging as messaging
from oslo_context import context as o_context

TOPIC = "compute"
NOTIFICATION_TOPIC = "notifications"

# Exceptions from these modules are rebuilt as themselves on the client side.
ALLOWED_EXMODS = ["compute_agent.exception"]


class ContextSerializer(messaging.NoOpSerializer):
    """Carries an oslo.context RequestContext (request id, ...) over the wire."""

    def serialize_context(self, ctxt):
        return ctxt.to_dict() if ctxt is not None else {}

    def deserialize_context(self, ctxt):
        return o_context.RequestContext.from_dict(ctxt or {})


def get_transport(conf, url: str | None = None) -> messaging.Transport:
    return messaging.get_rpc_transport(conf, url=url, allowed_remote_exmods=ALLOWED_EXMODS)


def get_notifier(conf, host: str) -> messaging.Notifier:
    transport = messaging.get_notification_transport(conf)
    publisher = f"compute.{host}"
    if conf.oslo_messaging_notifications.driver:  # the operator chose
        return messaging.Notifier(transport, publisher_id=publisher)
    # oslo.messaging's own default is no notifications at all; ours is to send them.
    return messaging.Notifier(transport, publisher_id=publisher, driver="messagingv2",
                              topics=[NOTIFICATION_TOPIC])
