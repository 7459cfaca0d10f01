"""aiohttp's own refusals as problem+json: the one place Cancelflow overrides aiohttp's server.

Why. A request aiohttp's HTTP parser refuses (a malformed request line, a header with bytes or
characters HTTP does not allow, a bad Content-Length, bad chunked encoding, an unsupported
Transfer-Encoding, a line over 8190 bytes, TLS sent to the plain port) never reaches the app:
``RequestHandler.handle_error`` answers it, bypassing every middleware, with a ``text/plain``
400 whose body echoes the offending line (a bearer token on it included), and logs it at ERROR
with a traceback carrying the same line. Here it is answered like every other refusal of the
API: a 400 ``malformed-request`` problem (docs/problems.md) with a ``Request-Id``, the
connection closed, and one ``api.request.malformed`` log line naming the parser's reason, never
the bytes. An error that escaped every middleware (a 500; a 504 on a handler's timeout) is
a problem too, logged with its traceback: that one is a bug of ours.

Second, llhttp (aiohttp's C parser) refuses a chunked body's framing (``zz\\r\\n`` as a chunk
size) that arrives after the request's headers by raising from ``feed_data`` without failing
the body the handler is reading: the handler would wait on it until the client hangs up. The
refusal aiohttp queues behind the request is handed to that body here, so the handler's read
raises it and the API answers 400 (``producers.api`` maps ``HttpProcessingError``).

What is overridden, and pinned (pyproject.toml: ``aiohttp`` to one minor version):
``RequestHandler.handle_error`` and ``RequestHandler.data_received`` (both public names on an
undocumented class; ``data_received`` reads the private ``_current_request`` and
``_messages``), ``Server.__call__`` (builds our handler from the private ``_loop`` and
``_kwargs``) and ``AppRunner._make_server`` (private; wrapped, not rewritten).
tests/producers/test_http_refusals.py holds a hash of each one's upstream source and fails
when an aiohttp upgrade changes any: read the new source, adapt this module, update the hash.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from cancelflow import metrics
from cancelflow.logging import get_logger
from producers.problems import Problem, problem

log = get_logger(__name__)

# producers.api.REQUEST_ID_HEADER (producers.api imports this module, not the other way).
REQUEST_ID_HEADER = "Request-Id"
# The parser's own reason for a refusal is the text before its first colon (llhttp's reasons
# are fixed phrases; what follows the colon is the offending line, which may hold a secret).
# Kept only when it reads as a phrase; anything else is named by the error's class alone.
_REASON = re.compile(r"[A-Za-z](?:[A-Za-z0-9 `-]|(?<=[a-z])'(?=[a-z])){2,79}")


def parser_reason(exc: BaseException) -> str:
    """What the parser said was wrong, without the bytes it was refusing."""
    message = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    head = str(message).split(":", 1)[0].strip()
    return head if _REASON.fullmatch(head) else type(exc).__name__


def refusal_detail(exc: BaseException) -> str:
    """The ``detail`` of a 400 for a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        what = "a line of the request (its request line or a header) is too long"
    elif isinstance(exc, BadHttpMethod):
        what = "this is not an HTTP request (TLS or another protocol, or a malformed method)"
    else:
        what = "the request is not valid HTTP/1.1"
    return f"{what}: {parser_reason(exc)}"


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own refusals as problem+json."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request the app never saw (refused by the parser) or whose error
        escaped every middleware; always closes the connection, as upstream's does."""
        if request.writer.output_size > 0:  # as upstream: an answer is half sent already
            raise ConnectionError("a response is sent already: cannot send the error")
        request_id = f"req_{uuid.uuid4().hex}"
        client = request.remote or "unknown"
        if status < 500:
            refused = exc if exc is not None else HttpProcessingError(message=message or "")
            log.info(
                "api.request.malformed",
                request_id=request_id,
                status=status,
                client=client,
                error=type(refused).__name__,
                reason=parser_reason(refused),
            )
            response = problem(status, Problem.MALFORMED_REQUEST, refusal_detail(refused))
            route = "unparsed"
        elif status == 504:
            log.warning("api.request.timed_out", request_id=request_id, path=request.path)
            response = problem(504, Problem.TIMED_OUT, "the request took too long to answer")
            route = "unmatched"
        else:
            log.error(
                "api.unexpected_error", request_id=request_id, path=request.path, exc_info=exc
            )
            response = problem(
                500, Problem.INTERNAL_ERROR, "the error is logged; nothing was enqueued twice"
            )
            route = "unmatched"
        metrics.api_request_done(request.method, route, status, 0.0)
        response.headers[REQUEST_ID_HEADER] = request_id
        response.force_close()
        return response

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        current = self._current_request
        if current is None or current.content.is_eof():
            return
        # A request whose body is not finished is the one the parser was reading (HTTP/1.1 is
        # one message after another): a refusal queued now is about that body.
        for message, _ in list(self._messages)[queued:]:
            if isinstance(message, _ErrInfo):
                current.content.set_exception(message.exc)
                current.content.feed_eof()  # nothing more will be read from it
                return


class ProblemServer(web.Server):
    """aiohttp's low-level server, making ``ProblemRequestHandler`` connections."""

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own refusals as problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app's start-up, as upstream runs it
        kwargs: dict[str, Any] = dict(server._kwargs)
        return ProblemServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **kwargs,
        )
