"""The pykka actors of entity-runtime and the runtime that starts and stops them.

Kind actors serialise each kind's mutations; consumer actors run the derivers,
trigger handlers and subscribers behind bounded mailboxes.
"""

import logging

import runtime  # noqa: F401  (the engine must be importable before the actors)
from actors._consumers import ConsumerActor
from actors._kind import KindActor, MutationFuture
from actors._mailbox import DeliveryTracker, Mailbox
from actors._runtime import EntityHandle, Runtime, StopReport

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ConsumerActor",
    "DeliveryTracker",
    "EntityHandle",
    "KindActor",
    "Mailbox",
    "MutationFuture",
    "Runtime",
    "StopReport",
]
