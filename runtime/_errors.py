from __future__ import annotations

from typing import Any


class EntityRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class DefinitionError(EntityRuntimeError, ValueError):
    """A kind, deriver, subscription or declaration was defined wrongly."""


class UnknownKindError(EntityRuntimeError, LookupError):
    """A kind was used that was never defined."""

    def __init__(self, kind: str, known: list[str]) -> None:
        self.kind = kind
        self.known = known
        listed = ", ".join(repr(k) for k in known) or "none"
        super().__init__(
            f"unknown kind {kind!r}; defined kinds: {listed}; "
            "define it first with Runtime.define_entity()"
        )


class UnknownFieldError(EntityRuntimeError, LookupError):
    """A query named a field that its kind's schema lacks and no row ever held."""

    def __init__(self, kind: str, field: str, known: tuple[str, ...]) -> None:
        self.kind = kind
        self.field = field
        self.known = known
        listed = ", ".join(repr(f) for f in known) or "none"
        super().__init__(
            f"{kind}: unknown field {field!r}; the schema's fields: {listed} (a "
            "field removed from the schema can still be asked for where rows of it "
            "were recorded)"
        )


class SchemaError(EntityRuntimeError, ValueError):
    """A state did not validate against its kind's schema; nothing was recorded."""

    def __init__(self, kind: str, entity_id: str, field: str | None, reason: str):
        self.kind = kind
        self.entity_id = entity_id
        self.field = field
        self.reason = reason
        where = f"field {field!r} " if field else ""
        super().__init__(f"{kind}/{entity_id}: {where}{reason}; nothing recorded")


class InvalidIdError(EntityRuntimeError, ValueError):
    """An entity id was not a usable string; nothing was recorded."""

    def __init__(self, kind: str, entity_id: Any, reason: str) -> None:
        self.kind = kind
        self.entity_id = entity_id
        self.reason = reason
        shown = repr(entity_id)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"{kind}: id {shown} {reason}; nothing recorded")


class InvalidTimeError(EntityRuntimeError, ValueError):
    """A time given for a change (or read from the clock) cannot be recorded."""


class ApplyError(EntityRuntimeError, RuntimeError):
    """The caller's ``apply`` raised; nothing was recorded.

    The caller's exception is kept as ``__cause__`` and as ``error``.
    """

    def __init__(self, kind: str, entity_id: str, error: BaseException) -> None:
        self.kind = kind
        self.entity_id = entity_id
        self.error = error
        super().__init__(
            f"{kind}/{entity_id}: apply raised {type(error).__name__}: {error}; "
            "nothing recorded"
        )


class ReadError(EntityRuntimeError, RuntimeError):
    """A plugin-backed kind's ``read`` raised or returned something unusable."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: read {reason}; nothing recorded")


class RuntimeStoppedError(EntityRuntimeError, RuntimeError):
    """The runtime is not running (never started, or already stopped)."""


class BackpressureError(EntityRuntimeError, RuntimeError):
    """A consumer stayed full past the producer's timeout; nothing was recorded."""


class DeliveryTimeoutError(EntityRuntimeError, TimeoutError):
    """Waiting for deliveries or a state ran past its timeout."""


class DurabilityError(EntityRuntimeError, OSError):
    """A change was applied in memory but could not be made durable on disk."""


class ActorFailedError(EntityRuntimeError, RuntimeError):
    """An actor failed outside user code while handling a request.

    The actor carries on (it keeps no state of its own); the request may or may
    not have been applied, and the message says how to check.
    """


class MutationBatchError(EntityRuntimeError, RuntimeError):
    """Some mutations of a ``mutate_many`` call failed; the others were applied.

    Attributes:
        results: one entry per item, in order: the next state, or ``None``
            where the item failed.
        errors: the failed items' errors, by index.
    """

    def __init__(self, results: list[Any], errors: dict[int, BaseException]) -> None:
        self.results = results
        self.errors = errors
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(results)} mutations failed (the others were "
            f"applied); first, item {first}: {errors[first]}"
        )


class ReentrantCallError(EntityRuntimeError, RuntimeError):
    """A call from one of the runtime's own threads would wait for itself."""


class HandlerExitError(EntityRuntimeError, RuntimeError):
    """A handler, deriver or payload mapper raised ``SystemExit``, ``KeyboardInterrupt``
    or another exception that is not an ``Exception``.

    On a runtime thread such an exception cannot mean "stop the program" (it
    would only stop the actors); it is treated as the call failing, and the
    original is kept as ``__cause__``.
    """


class MaskedHandlerError(EntityRuntimeError, RuntimeError):
    """A handler failed on a change written with run secrets; the text is masked.

    Raised in place of the handler's own error where that error would be
    recorded beyond the process (a bus work queue's retries log and dead
    letters): its message is ``"<type>: <message>"`` of the original with the
    run's secrets masked, and the original is not chained.
    """
