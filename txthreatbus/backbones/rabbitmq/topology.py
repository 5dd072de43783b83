"""
What the backbone declares on the broker, in the layout of Threat Bus
2020.11.26's RabbitMQ backbone: one fanout exchange per message type
(``threatbus.intel``, ``threatbus.sighting``, ...), redeclared on every
connect, durable unless ``durable_exchanges`` is false (Threat Bus declares
them transient), and one queue per instance and type, ``threatbus.<type>.<name_suffix or hostname>``, bound to it; names are
joined with ``naming_join_pattern``.
"""

from __future__ import annotations

import socket
from typing import Dict

import attrs
from pika.exchange_type import ExchangeType

from txthreatbus.config import QueueConfig, RabbitMQConfig
from txthreatbus.model import CLASSES

#: The type name of each message class: each type has its exchange and queue.
TYPES = {cls: cls.kind for cls in CLASSES}
#: The bus topic of each type name.
TOPICS = {kind: cls.topic for cls, kind in TYPES.items()}


def exchange_name(join: str, kind: str) -> str:
    """The fanout exchange of message type ``kind`` (``intel``, ...)."""
    return join.join(("threatbus", kind))


def queue_name(join: str, kind: str, suffix: str) -> str:
    """The queue of one instance (``suffix``) for message type ``kind``."""
    return join.join(("threatbus", kind, suffix))


def queue_arguments(queue: QueueConfig) -> dict:
    """The ``x-`` arguments that declare a queue with the options of ``queue``."""
    arguments = {"x-queue-mode": "lazy" if queue.lazy else "default"}
    if queue.max_items > 0:
        arguments["x-max-length"] = queue.max_items
    return arguments


@attrs.frozen
class Topology:
    """The exchanges and queues of one instance, by message type name."""

    exchanges: Dict[str, str]
    queues: Dict[str, str]
    queue: QueueConfig
    arguments: dict
    durable_exchanges: bool = True

    @classmethod
    def of(cls, config: RabbitMQConfig) -> "Topology":
        join = config.naming_join_pattern
        suffix = config.queue.name_suffix or socket.gethostname()
        kinds = TYPES.values()
        return cls(
            exchanges={kind: exchange_name(join, kind) for kind in kinds},
            queues={kind: queue_name(join, kind, suffix) for kind in kinds},
            queue=config.queue,
            arguments=queue_arguments(config.queue),
            durable_exchanges=config.durable_exchanges,
        )

    async def declare(self, channel) -> None:
        """Declare every exchange and queue on ``channel``, and bind them."""
        queue = self.queue
        for kind, exchange in self.exchanges.items():
            await channel.exchange_declare(
                exchange=exchange, exchange_type=ExchangeType.fanout, durable=self.durable_exchanges
            )
            await channel.queue_declare(
                queue=self.queues[kind],
                durable=queue.durable,
                exclusive=queue.exclusive,
                auto_delete=queue.auto_delete,
                arguments=self.arguments,
            )
            await channel.queue_bind(queue=self.queues[kind], exchange=exchange)
