"""entity-runtime: an actor-based, in-memory runtime for reactive entities."""

import logging

from runtime._delivery import Broadcast, DeadLetter, WorkQueue, broadcast, work_queue
from runtime._diff import diff_states, same_value
from runtime._durability import RestoreError
from runtime._errors import (
    ActorFailedError,
    ApplyError,
    BackpressureError,
    DefinitionError,
    DeliveryTimeoutError,
    DurabilityError,
    EntityRuntimeError,
    HandlerExitError,
    InvalidIdError,
    InvalidTimeError,
    MaskedHandlerError,
    MutationBatchError,
    ReadError,
    ReentrantCallError,
    RuntimeStoppedError,
    SchemaError,
    UnknownFieldError,
    UnknownKindError,
)
from runtime._events import (
    SYSTEM_ACTOR,
    EntityChanged,
    ReadOnlyDict,
    ReadOnlyList,
    Transition,
    freeze,
    thaw,
)
from runtime._metrics import MetricsBindError, MetricsServer, RuntimeMetrics
from runtime._persistence import (
    CorruptFileError,
    DataDirError,
    DataDirLockedError,
    FormatVersionError,
)
from runtime._schema import StateSchema, compile_schema, validate_value
from runtime._secrets import MASK, MIN_SECRET_LENGTH

logging.getLogger(__name__).addHandler(logging.NullHandler())

# The Redis change bus is imported on first use only, so that a runtime
# without a bus never imports redis.
_BUS_NAMES = frozenset(
    {
        "BroadcastReader",
        "BusClosedError",
        "ChangeTooLargeError",
        "Delivery",
        "NotOwnerError",
        "PartitionMap",
        "PartitionMapMismatchError",
        "RedisBus",
        "WorkQueueReader",
    }
)


def __getattr__(name: str) -> object:
    if name in _BUS_NAMES:
        from runtime import _redis_bus

        return getattr(_redis_bus, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The runtime proper lives with the actors that it starts and stops; it is
# imported last because it builds on everything above.
from actors._kind import MutationFuture  # noqa: E402
from actors._runtime import (  # noqa: E402
    EntityHandle,
    NonReactiveState,
    Runtime,
    StopReport,
    Unsubscribe,
)

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "SYSTEM_ACTOR",
    "ActorFailedError",
    "ApplyError",
    "BackpressureError",
    "Broadcast",
    "CorruptFileError",
    "DataDirError",
    "DataDirLockedError",
    "DeadLetter",
    "DefinitionError",
    "DeliveryTimeoutError",
    "DurabilityError",
    "EntityChanged",
    "EntityHandle",
    "EntityRuntimeError",
    "FormatVersionError",
    "HandlerExitError",
    "InvalidIdError",
    "InvalidTimeError",
    "MaskedHandlerError",
    "MetricsBindError",
    "MetricsServer",
    "MutationBatchError",
    "MutationFuture",
    "NonReactiveState",
    "ReadError",
    "ReadOnlyDict",
    "ReadOnlyList",
    "ReentrantCallError",
    "RestoreError",
    "Runtime",
    "RuntimeMetrics",
    "RuntimeStoppedError",
    "SchemaError",
    "StateSchema",
    "StopReport",
    "Transition",
    "UnknownFieldError",
    "UnknownKindError",
    "Unsubscribe",
    "WorkQueue",
    "broadcast",
    "compile_schema",
    "diff_states",
    "freeze",
    "same_value",
    "thaw",
    "validate_value",
    "work_queue",
]
