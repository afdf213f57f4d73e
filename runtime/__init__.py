"""entity-runtime: an actor-based, in-memory runtime for reactive entities."""

import logging

from runtime._diff import diff_states, same_value
from runtime._errors import (
    ApplyError,
    BackpressureError,
    DefinitionError,
    DeliveryTimeoutError,
    EntityRuntimeError,
    InvalidIdError,
    ReadError,
    RuntimeStoppedError,
    SchemaError,
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
from runtime._schema import StateSchema, compile_schema, validate_value

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "SYSTEM_ACTOR",
    "ApplyError",
    "BackpressureError",
    "DefinitionError",
    "DeliveryTimeoutError",
    "EntityChanged",
    "EntityRuntimeError",
    "InvalidIdError",
    "ReadError",
    "ReadOnlyDict",
    "ReadOnlyList",
    "RuntimeStoppedError",
    "SchemaError",
    "StateSchema",
    "Transition",
    "UnknownKindError",
    "compile_schema",
    "diff_states",
    "freeze",
    "same_value",
    "thaw",
    "validate_value",
]
