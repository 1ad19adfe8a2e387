"""StreamingPull: one generator thread sends batches, one reader thread applies acks and modacks.

A stream is registered with the subscription for exactly as long as the RPC lives: the gRPC
termination callback (client cancel, lost connection, killed process) forgets it at once, so new
messages only go to live streams while the dead stream's leases run out and redeliver.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from emulator import _pb
from emulator.broker import Broker
from emulator.errors import EmulatorError, InvalidArgument, Unavailable
from emulator.model import UNLIMITED, Stream
from emulator.subscription import Delivery, SubscriptionState

_log = structlog.get_logger(__name__)

# How long the sender waits for messages between checks that its stream is alive and not
# silenced (a fault); the wait ends at once when a message is ready.
_SILENCE_CHECK_SECONDS = 1.0
_stream_ids = itertools.count(1)


class StreamRegistry:
    """Keeps the reader threads so shutdown can join them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def add(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)

    def join(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)


def _check_first(first: Any) -> None:
    if not first.subscription:
        raise InvalidArgument("The first StreamingPullRequest must set subscription.")
    if not 10 <= first.stream_ack_deadline_seconds <= 600:
        raise InvalidArgument(
            "Invalid stream_ack_deadline_seconds: must be between 10 and 600 seconds "
            f"(got {first.stream_ack_deadline_seconds})."
        )


def serve_stream(
    broker: Broker,
    registry: StreamRegistry,
    requests: Iterator[Any],
    context: grpc.ServicerContext,
    on_first: Callable[[Any], None] = lambda _first: None,
    silenced: Callable[[], bool] = lambda: False,
) -> Iterator[Any]:
    """The StreamingPull handler body; never ends with OK, which the client treats as fatal."""
    first = next(requests, None)
    if first is None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "The stream closed before its first request.")
    on_first(first)
    try:
        if broker.shutting_down:
            raise Unavailable("The emulator is shutting down.")
        _check_first(first)
        state = broker.subscription(first.subscription)
        ordered = broker.message_ordering(first.subscription)
        stream = state.open_stream(
            first.client_id,
            first.max_outstanding_messages,
            first.max_outstanding_bytes,
            first.stream_ack_deadline_seconds,
        )
    except EmulatorError as exc:
        context.abort(grpc.StatusCode[exc.code], str(exc))
    context.add_callback(lambda: state.close_stream(stream, "CANCELLED", "The stream ended."))
    try:
        _apply(state, stream, first)
    except InvalidArgument as exc:
        state.close_stream(stream, exc.code, str(exc))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    reader = threading.Thread(
        target=_read,
        args=(state, stream, requests, silenced),
        daemon=True,
        name=f"emulator-stream-reader-{next(_stream_ids)}",
    )
    registry.add(reader)
    reader.start()
    yield from _send(state, stream, ordered, context, silenced)
    context.abort(grpc.StatusCode[stream.close_code], stream.close_reason or "Stream closed.")


def _send(
    state: SubscriptionState,
    stream: Stream,
    ordered: bool,
    context: grpc.ServicerContext,
    silenced: Callable[[], bool],
) -> Iterator[Any]:
    while context.is_active():
        batch = [] if silenced() else state.take(stream, UNLIMITED, _SILENCE_CHECK_SECONDS)
        if batch is None:
            return
        if silenced():  # a fault: what it took goes back (it never left), then nothing more
            if batch:
                state.modify_deadline([ack_id for ack_id, _, _ in batch], 0)
            _log.info("stream_silenced", client_id=stream.client_id)
            while context.is_active():
                threading.Event().wait(_SILENCE_CHECK_SECONDS)
            return
        if batch:
            yield _response(batch, ordered, state.policy.max_attempts > 0)


def _response(batch: list[Delivery], ordered: bool, with_attempt: bool) -> Any:
    resp = _pb.StreamingPullResponse()
    resp.subscription_properties.message_ordering_enabled = ordered
    add = resp.received_messages.add
    if with_attempt:
        for ack_id, msg, attempt in batch:
            add(ack_id=ack_id, message=msg, delivery_attempt=attempt)
    else:
        for ack_id, msg, _ in batch:
            add(ack_id=ack_id, message=msg)
    return resp


def _read(
    state: SubscriptionState,
    stream: Stream,
    requests: Iterator[Any],
    silenced: Callable[[], bool],
) -> None:
    try:
        for request in requests:
            if not silenced():
                _apply(state, stream, request)
    except InvalidArgument as exc:
        state.close_stream(stream, exc.code, str(exc))
        return
    except grpc.RpcError:
        pass  # cancelled or connection lost: the termination callback has closed the stream
    except Exception:
        _log.exception("stream_reader_failed")
    state.close_stream(stream, "UNAVAILABLE", "The client stopped sending.")


def _apply(state: SubscriptionState, stream: Stream, request: Any) -> None:
    if request.ack_ids:
        state.acknowledge(request.ack_ids)
    if request.modify_deadline_ack_ids:
        if len(request.modify_deadline_ack_ids) != len(request.modify_deadline_seconds):
            raise InvalidArgument(
                "modify_deadline_ack_ids and modify_deadline_seconds must have the same length."
            )
        if any(not 0 <= seconds <= 600 for seconds in request.modify_deadline_seconds):
            raise InvalidArgument("modify_deadline_seconds must be between 0 and 600 seconds.")
        by_seconds: defaultdict[int, list[str]] = defaultdict(list)
        for ack_id, seconds in zip(
            request.modify_deadline_ack_ids, request.modify_deadline_seconds, strict=True
        ):
            by_seconds[seconds].append(ack_id)
        for seconds, ack_ids in by_seconds.items():
            state.modify_deadline(ack_ids, seconds)
    if request.stream_ack_deadline_seconds:
        if not 10 <= request.stream_ack_deadline_seconds <= 600:
            raise InvalidArgument("stream_ack_deadline_seconds must be between 10 and 600 seconds.")
        state.set_stream_deadline(stream, request.stream_ack_deadline_seconds)
