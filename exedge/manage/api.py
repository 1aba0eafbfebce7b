"""
The management endpoint: an HTTP/JSON API over the running server.

One leaf resource dispatches on the path, with every path segment checked
against a pattern before it is used (queue identities are short words,
message identities are spool queue ids): a table of routes reads as the
API's documentation, where a tree of Resource classes, one per segment,
would spread it over a dozen classes. Klein would do the same with a
dependency more; twisted.web is already here.

Every answer is JSON, errors included: {"error": "...", "status": N}, with
the HTTP status that fits (400 bad request, 401 no or wrong token, 404
unknown path or identity, 405 wrong method, 409 refused as asked, 413 too
large). Nothing a request says reaches a shell or a file name; what is
logged of it is escaped by twisted.logger's structured fields.
"""

from __future__ import annotations

import hmac
import json
import re
import time

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from exedge.interfaces import QueueActionRefused

log = Logger()

QUEUE_ID = re.compile(r"[A-Za-z0-9]{1,32}")
MESSAGE_ID = re.compile(r"[0-9A-F]{14,40}")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _epoch(value):
    return None if value is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def queue_json(q, server_name: str) -> dict:
    return {
        "identity": f"{server_name}\\{q.identity}", "id": q.identity,
        "delivery_type": _delivery_type(q), "next_hop_domain": q.hop.destination or q.hop.connector,
        "connector": q.hop.connector, "lane": q.hop.lane, "status": q.status,
        "message_count": q.message_count, "hold_reason": q.hold_reason, "last_error": q.last_error,
        "next_retry_time": _epoch(q.next_retry), "oldest_message": _epoch(q.oldest),
    }


def _delivery_type(q) -> str:
    """Exchange's DeliveryType column: what kind of next hop the queue serves."""
    if q.identity == "Unreachable":
        return "Unreachable"
    if q.identity == "Deferred":
        return "Deferred"
    return "DnsConnectorDelivery" if q.hop.destination else "SmartHostConnectorDelivery"


def message_json(m, server_name: str) -> dict:
    return {
        "identity": m.identity, "status": m.status, "from_address": m.sender,
        "recipients": [{"address": r.address, "status": r.status, "queue": r.queue, "last_error": r.last_error}
                       for r in m.recipients],
        "size": m.size, "date_received": _epoch(m.received_at), "queue": list(m.queues),
        "last_error": m.last_error, "receive_connector": m.receive_connector, "peer": m.peer,
        "subject": m.subject, "message_id": m.message_id,
    }


@attrs.define
class Route:
    method: str
    pattern: re.Pattern
    handler: object
    body: bool = False          # reads a JSON object from the request body


class LimitedRequest(server.Request):
    """
    A request that stops keeping its body past C{max_body} octets (chunked
    or not): the endpoint answers 413 instead of buffering what a hostile
    client sends.
    """

    max_body = 65536
    _received = 0
    too_large = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0              # nothing is kept
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            return
        super().handleContentChunk(data)


class ManagementAPI(resource.Resource):
    """
    C{admin}: the queues (L{exedge.interfaces.IQueueAdmin}); C{status}: a
    callable giving the server's status as a dict; C{reload}: a callable
    returning a Deferred of the reload's result (a dict); C{metrics}: a
    callable giving the Prometheus text; C{token}: the bearer token every
    request must carry (None on the UNIX socket, where the file's mode is
    the access control).
    """

    isLeaf = True

    def __init__(self, admin, *, server_name: str, status, reload=None, metrics=None, page=None,
                 token: str | None = None):
        super().__init__()
        self.admin = admin
        self.server_name = server_name
        self.status = status
        self.reload = reload
        self.metrics = metrics
        self.page = page
        self.token = token
        q, m = QUEUE_ID.pattern, MESSAGE_ID.pattern
        self.routes = [
            Route("GET", re.compile(r"/api/status"), self._status),
            Route("GET", re.compile(r"/api/queues"), self._queues),
            Route("GET", re.compile(rf"/api/queues/(?P<queue>{q})"), self._queue),
            Route("GET", re.compile(rf"/api/queues/(?P<queue>{q})/messages"), self._messages),
            Route("POST", re.compile(rf"/api/queues/(?P<queue>{q})/(?P<verb>retry|suspend|resume|redirect)"),
                  self._queue_action, body=True),
            Route("GET", re.compile(r"/api/messages"), self._messages),
            Route("GET", re.compile(rf"/api/messages/(?P<message>{m})"), self._message),
            Route("GET", re.compile(rf"/api/messages/(?P<message>{m})/eml"), self._export),
            Route("POST", re.compile(rf"/api/messages/(?P<message>{m})/(?P<verb>suspend|resume|remove)"),
                  self._message_action, body=True),
            Route("POST", re.compile(r"/api/reload"), self._reload, body=True),
            Route("GET", re.compile(r"/metrics"), self._metrics),
            Route("GET", re.compile(r"/"), self._page),
        ]

    # -- dispatch ------------------------------------------------------------

    def render(self, request):
        d = defer.maybeDeferred(self._dispatch, request)
        d.addCallback(self._done, request)
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _authorised(self, request) -> bool:
        if self.token is None:
            return True
        given = request.getHeader(b"authorization") or b""
        scheme, _, value = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token.encode())

    def _dispatch(self, request):
        if getattr(request, "too_large", False):
            raise ApiError(413, f"request body larger than {request.max_body} octets")
        try:
            path = request.path.decode("ascii")
        except UnicodeDecodeError:
            raise ApiError(400, "the path must be ASCII") from None
        method = request.method.decode("ascii", "replace")
        if not self._authorised(request) and path != "/":
            raise ApiError(401, "a bearer token is required (Authorization: Bearer <token from [management] token_file>)")
        allowed = []
        for route in self.routes:
            found = route.pattern.fullmatch(path)
            if found is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            body = self._body(request) if route.body else {}
            return route.handler(request, body=body, **found.groupdict())
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
            raise ApiError(405, f"{method} is not allowed on this path (allowed: {', '.join(allowed)})")
        raise ApiError(404, "no such resource")

    def _body(self, request) -> dict:
        request.content.seek(0)
        raw = request.content.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _done(self, result, request):
        if request._disconnected:
            return
        if isinstance(result, Raw):
            request.setHeader(b"content-type", result.content_type)
            if result.filename:
                request.setHeader(b"content-disposition", b'attachment; filename="%s"' % result.filename.encode())
            request.write(result.data)
        else:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(result, indent=1).encode() + b"\n")
        request.finish()

    def _failed(self, failure: Failure, request):
        if request._disconnected:
            return
        if failure.check(ApiError):
            status, message = failure.value.status, failure.value.message
        elif failure.check(QueueActionRefused):
            status, message = 409, str(failure.value)
        elif failure.check(KeyError):
            status, message = 404, f"no such queue or message: {failure.value.args[0]}"
        else:
            log.failure("management request {method} {path}", failure,
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "backslashreplace"))
            status, message = 500, "internal error (the server's log says more)"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.write(json.dumps({"error": message, "status": status}).encode() + b"\n")
        request.finish()

    # -- resources -------------------------------------------------------------

    def _status(self, request, body):
        return self.status()

    def _queues(self, request, body):
        return {"queues": [queue_json(q, self.server_name) for q in self.admin.queue_infos()]}

    def _find_queue(self, identity: str):
        for q in self.admin.queue_infos():
            if q.identity.lower() == identity.lower():
                return q
        raise ApiError(404, f"no queue {identity!r}")

    def _queue(self, request, body, queue):
        return queue_json(self._find_queue(queue), self.server_name)

    def _messages(self, request, body, queue=None):
        if queue is None:
            wanted = request.args.get(b"queue", [None])[0]
            if wanted is not None:
                queue = wanted.decode("ascii", "replace")
                if not QUEUE_ID.fullmatch(queue):
                    raise ApiError(400, "queue must be a queue identity (letters and digits)")
        if queue is not None:
            queue = self._find_queue(queue).identity
        limit = _limit(request.args.get(b"limit", [None])[0])
        messages, total = self.admin.message_page(queue, limit)
        return {"messages": [message_json(m, self.server_name) for m in messages],
                "total": total, "truncated": total > len(messages)}

    def _message(self, request, body, message):
        m = self.admin.message_info(message)
        if m is None:
            raise ApiError(404, f"no message {message}")
        return message_json(m, self.server_name)

    def _export(self, request, body, message):
        d = self.admin.export_message(message)
        return d.addCallback(lambda data: Raw(data, b"message/rfc822", f"{message}.eml"))

    def _queue_action(self, request, body, queue, verb):
        resubmit = _flag(body, "resubmit")       # the request checked before the queue is looked for
        identity = self._find_queue(queue).identity
        if verb == "retry":
            self.admin.retry_queue(identity, resubmit=resubmit)
        elif verb == "suspend":
            self.admin.suspend_queue(identity)
        elif verb == "resume":
            self.admin.resume_queue(identity)
        else:
            connector = body.get("connector")
            if not isinstance(connector, str) or not connector.strip() or len(connector) > 256:
                raise ApiError(400, 'redirect needs {"connector": "<send connector name>"}')
            self.admin.redirect_queue(identity, connector)
        return {"queue": identity, "done": verb}

    def _message_action(self, request, body, message, verb):
        if verb == "suspend":
            self.admin.suspend_message(message)
        elif verb == "resume":
            self.admin.resume_message(message)
        else:
            ndr = _flag(body, "ndr")
            return self.admin.remove_message(message, ndr).addCallback(
                lambda _: {"message": message, "done": "remove", "ndr": ndr})
        return {"message": message, "done": verb}

    def _reload(self, request, body):
        if self.reload is None:
            raise ApiError(404, "reload is not available here")
        return self.reload()

    def _metrics(self, request, body):
        if self.metrics is None:
            raise ApiError(404, "no metrics here")
        return Raw(self.metrics(), b"text/plain; version=0.0.4; charset=utf-8")

    def _page(self, request, body):
        if self.page is None:
            raise ApiError(404, "no page here")
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'")
        return Raw(self.page, b"text/html; charset=utf-8")


@attrs.frozen
class Raw:
    data: bytes
    content_type: bytes
    filename: str = ""


DEFAULT_MESSAGE_LIMIT = 1000      # Exchange's Get-Message -ResultSize default
MAX_MESSAGE_LIMIT = 1_000_000


def _limit(raw: bytes | None) -> int | None:
    """?limit=N (1 to a million) or ?limit=unlimited; absent: the first 1,000."""
    if raw is None:
        return DEFAULT_MESSAGE_LIMIT
    if raw.lower() == b"unlimited":
        return None
    if not re.fullmatch(rb"[0-9]{1,7}", raw) or not 1 <= int(raw) <= MAX_MESSAGE_LIMIT:
        raise ApiError(400, f"limit must be a number from 1 to {MAX_MESSAGE_LIMIT:,} or unlimited")
    return int(raw)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false")
    return value


class ManagementSite(server.Site):
    """A Site whose requests refuse bodies past C{max_body} and which logs nothing per request."""

    def __init__(self, api: ManagementAPI, max_body: int):
        super().__init__(api)
        limit = max_body

        class Request(LimitedRequest):
            max_body = limit

        self.requestFactory = Request
        self.displayTracebacks = False

    def log(self, request):
        pass    # the access log would be every Queue Viewer refresh; actions are logged where they happen
