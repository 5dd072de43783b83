"""
The RabbitMQ backbone: several txthreatbus instances share one bus through a
RabbitMQ broker, in the layout of Threat Bus 2020.11.26's RabbitMQ backbone.

- ``topology``: the exchanges and queues, as Threat Bus names them;
- ``batches``: several bus messages in one AMQP message;
- ``outgoing``: what this instance publishes, held until confirmed;
- ``incoming``: what the broker delivers, deduplicated, to the bus, then acked;
- ``connection``: reaching the broker (TCP or TLS) with pika's protocol;
- ``diagnosis``: why a connection failed, in one line;
- ``service``: ``RabbitMQBackbone``, on Twisted's ``ClientService``.

Every instance, this one included, takes what it publishes back from its own
queues: local traffic goes through the broker, never also straight to the
local bus. Bodies are the JSON of docs/protocol.md.
"""

from txthreatbus.backbones.rabbitmq.service import RabbitMQBackbone

__all__ = ["RabbitMQBackbone"]
