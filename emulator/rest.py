"""The REST paths Google's emulator serves, on a stdlib ThreadingHTTPServer, in the API's camelCase.

Bodies are converted with google.protobuf.json_format and handed to the same `Service` as gRPC.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.iam.v1 import iam_policy_pb2
from google.protobuf import json_format

from emulator import _pb, limits
from emulator.broker import Broker
from emulator.errors import EmulatorError, InvalidArgument, NotFound
from emulator.service import Service

_P = r"/v1/projects/(?P<project>[^/:]+)"
_T = _P + r"/topics/(?P<topic>[^/:]+)"
_S = _P + r"/subscriptions/(?P<sub>[^/:]+)"

_GET_POLICY = iam_policy_pb2.GetIamPolicyRequest
_SET_POLICY = iam_policy_pb2.SetIamPolicyRequest
_TEST = iam_policy_pb2.TestIamPermissionsRequest

# (HTTP method, path pattern, RPC name, request type); the path names the resource.
_ROUTES: list[tuple[str, re.Pattern[str], str, Any]] = [
    ("GET", re.compile(_P + "/topics"), "ListTopics", _pb.ListTopicsRequest),
    ("PUT", re.compile(_T), "CreateTopic", _pb.Topic),
    ("GET", re.compile(_T), "GetTopic", _pb.GetTopicRequest),
    ("PATCH", re.compile(_T), "UpdateTopic", _pb.UpdateTopicRequest),
    ("DELETE", re.compile(_T), "DeleteTopic", _pb.DeleteTopicRequest),
    ("POST", re.compile(_T + ":publish"), "Publish", _pb.PublishRequest),
    (
        "GET",
        re.compile(_T + "/subscriptions"),
        "ListTopicSubscriptions",
        _pb.ListTopicSubscriptionsRequest,
    ),
    ("GET", re.compile(_P + "/subscriptions"), "ListSubscriptions", _pb.ListSubscriptionsRequest),
    ("PUT", re.compile(_S), "CreateSubscription", _pb.Subscription),
    ("GET", re.compile(_S), "GetSubscription", _pb.GetSubscriptionRequest),
    ("PATCH", re.compile(_S), "UpdateSubscription", _pb.UpdateSubscriptionRequest),
    ("DELETE", re.compile(_S), "DeleteSubscription", _pb.DeleteSubscriptionRequest),
    ("POST", re.compile(_S + ":pull"), "Pull", _pb.PullRequest),
    ("POST", re.compile(_S + ":acknowledge"), "Acknowledge", _pb.AcknowledgeRequest),
    *(
        route
        for resource in (_T, _S)
        for route in (
            ("GET", re.compile(resource + ":getIamPolicy"), "GetIamPolicy", _GET_POLICY),
            ("POST", re.compile(resource + ":setIamPolicy"), "SetIamPolicy", _SET_POLICY),
            ("POST", re.compile(resource + ":testIamPermissions"), "TestIamPermissions", _TEST),
        )
    ),
    (
        "POST",
        re.compile(_S + ":modifyAckDeadline"),
        "ModifyAckDeadline",
        _pb.ModifyAckDeadlineRequest,
    ),
]


def _fill_path(request: Any, match: re.Match[str]) -> None:
    """Put the resource named by the URL into the request (or into its nested resource)."""
    fields = match.groupdict()
    project = f"projects/{fields['project']}"
    topic = f"{project}/topics/{fields['topic']}" if fields.get("topic") else None
    sub = f"{project}/subscriptions/{fields['sub']}" if fields.get("sub") else None
    names = request.DESCRIPTOR.fields_by_name
    if "resource" in names:
        request.resource = topic or sub
    elif "project" in names:
        request.project = project
    elif isinstance(request, _pb.Topic):
        request.name = topic
    elif isinstance(request, _pb.Subscription):
        request.name = sub
    elif isinstance(request, _pb.UpdateTopicRequest):
        request.topic.name = topic
    elif isinstance(request, _pb.UpdateSubscriptionRequest):
        request.subscription.name = sub
    elif "subscription" in names:
        request.subscription = sub
    elif "topic" in names:
        request.topic = topic


def _parse(request_type: Any, body: bytes, query: str, match: re.Match[str]) -> Any:
    request = request_type()
    try:
        if body.strip():
            json_format.Parse(body, request)
        params = {k: v[0] for k, v in parse_qs(query).items()}
        if params:
            json_format.ParseDict(params, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError) as exc:
        raise InvalidArgument(f"Invalid JSON payload: {exc}") from exc
    _fill_path(request, match)
    return request


def _handler_class(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = self._read_body(length)
                status, payload = HTTPStatus.OK, self._call(url.path, url.query, body)
            except EmulatorError as exc:
                status = HTTPStatus(exc.http_status)
                payload = {
                    "error": {"code": exc.http_status, "message": str(exc), "status": exc.code}
                }
            self._reply(status, payload)

        def _read_body(self, length: int) -> bytes:
            """The body; one over the front end's cap is refused, after draining it in bounded
            chunks so that the client reads our answer rather than a reset connection."""
            if length > limits.MAX_PAYLOAD_BYTES:
                left = length
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                    left -= len(chunk)
                limits.check_payload(length)
            return self.rfile.read(length) if length else b""

        def _call(self, path: str, query: str, body: bytes) -> dict[str, Any]:
            if path == "/emulator/stats" and self.command == "GET":
                return dict(service.b.stats())
            for method, pattern, rpc, request_type in _ROUTES:
                match = pattern.fullmatch(path)
                if match and method == self.command:
                    rpc_fn: Callable[[Any], Any] = getattr(service, rpc)
                    response = rpc_fn(_parse(request_type, body, query, match))
                    return json_format.MessageToDict(response)
            raise NotFound(f"No REST route for {self.command} {path}")

        def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the emulator's own log

    return Handler


class RestServer:
    """Serves the REST API on its own named thread; `stop()` shuts it down and joins."""

    def __init__(self, broker: Broker, host: str, port: int) -> None:
        self._httpd = ThreadingHTTPServer((host, port), _handler_class(Service(broker)))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="emulator-rest", daemon=True
        )

    def start(self) -> str:
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
