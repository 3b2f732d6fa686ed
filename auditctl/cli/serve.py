"""``serve``: the web dashboard (``auditctl.web``), on loopback unless told otherwise."""

from __future__ import annotations

import click

from ..errors import AuditctlError
from .app import cli
from .options import common_options, echo_status, max_attempts_option, max_resets_option, threshold_options


class ListenError(AuditctlError):
    """The address or port cannot be listened on (in use, not ours, no permission)."""


def _not_empty(ctx: click.Context, param: click.Parameter, value):
    """An empty or blank value given on the command line (``--token "$UNSET"`` in a unit file) is a usage
    error, as an empty ``AUDITCTL_WEB_TOKEN`` is: never a read-only dashboard (or a host nobody named)
    without a word."""
    from click.core import ParameterSource

    if isinstance(value, str) and not value.strip() and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
        wanted = "the token, or leave --token out for a read-only dashboard" if param.name == "token" \
            else "an address such as 127.0.0.1, or leave --host out"
        raise click.BadParameter(f"is empty: give {wanted}", ctx, param)
    return value


@cli.command()
@common_options
@threshold_options
@click.option("--host", default="127.0.0.1", show_default=True, envvar="AUDITCTL_WEB_HOST", show_envvar=True,
              callback=_not_empty, metavar="ADDRESS",
              help="Address to listen on. Anything but loopback exposes the fleet to the network: put a TLS proxy in front.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, envvar="AUDITCTL_WEB_PORT",
              show_envvar=True, help="Port to listen on (0: any free port, printed at start).")
@click.option("--token", envvar="AUDITCTL_WEB_TOKEN", show_envvar=True, default=None, metavar="TOKEN",
              callback=_not_empty,
              help="The token that allows actions (reset, recover); without it the dashboard is read-only. "
                   "Prefer the environment variable: a flag is visible to other users in ps.")
@max_attempts_option("Recover with requeue: after this many claims an audit fails for good.")
@max_resets_option("Reset All Audits leaves alone an audit already reset this many times (0: no limit).")
def serve(state, policy, allow_unsafe, host, port, token, max_attempts, max_resets):
    """Serve the web dashboard: live status, stuck audits and why, Reset All Audits.

    \b
    Pages:  /  (overview)   /stuck   /audits   /audits/ID   /workers   /login
    JSON:   /api/health  /api/overview  /api/stuck  /api/audits  /api/audits/ID
            /api/workers
            POST /api/recover  POST /api/reset-all  (Authorization: Bearer TOKEN)

    Reading needs no credential. Actions need the token: people sign in at /login,
    scripts send it as a bearer token. The dashboard survives a lost database: it
    shows an alert and recovers by itself when the database is back. Ctrl-C or
    SIGTERM stop it.
    """
    import logging

    from ..thresholds import UnsafeThreshold

    try:
        policy.check_bounds([], allow_unsafe=allow_unsafe)
    except UnsafeThreshold as error:
        raise click.UsageError(str(error)) from None
    token = token.strip() if token else None
    level = logging.INFO if state.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("auditctl").setLevel(level)

    from ..web import create_app  # Starlette and uvicorn: only for this command

    app = create_app(state.database_url, policy=policy, token=token, host=host, allow_unsafe=allow_unsafe,
                     max_attempts=max_attempts, max_resets=max_resets)
    dashboard = app.state.dashboard
    sock = _listen(host, port)
    try:
        import uvicorn

        config = uvicorn.Config(app, log_level="info" if state.verbose else "warning", access_log=state.verbose > 1,
                                lifespan="off", server_header=False, http=_protocol_class())
        server = _server_class()(config)
        bound = sock.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        actions = "actions need the token (sign in at /login)" if token else "read-only: no token, so actions are disabled"
        echo_status(state, f"Dashboard at http://{shown_host}:{bound}/ over {dashboard.where}; {actions}. Ctrl-C to stop.")
        from ..web.security import is_loopback

        if token and len(token) < 16:
            echo_status(state, "Warning: the token is shorter than 16 characters; anyone who can reach the port "
                               "may guess it. Use a long random one (openssl rand -hex 16).", force=True)
        if not is_loopback(host.lower()):
            echo_status(state, f"Warning: listening on {host}: anyone who can reach it sees the fleet, over plain HTTP "
                               "(the token too). Put a TLS proxy in front, or listen on 127.0.0.1.", force=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        dashboard.close()
    echo_status(state, "serve stopped.")


def _listen(host: str, port: int):
    """A listening socket, bound here so that a port in use is one clear error (exit 1), not a traceback."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ListenError(f"cannot listen on {host}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # Restart at once after a stop (connections in TIME_WAIT); on Linux this never allows two listeners.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        hint = "; another process listens there: pick another --port" if error.errno == errno.EADDRINUSE else ""
        raise ListenError(f"cannot listen on {host}:{port}: {(error.strerror or str(error)).lower()}{hint}") from None
    return sock


#: Seconds a connection has to send a whole request head, from when it opens or its last response
#: ends. uvicorn closes an idle connection only after a response; one that opened and sent nothing,
#: or half a request, stayed open for good, and enough of them would use up the process's files.
REQUEST_HEAD_DEADLINE = 10.0


def _protocol_class():
    """uvicorn's h11 protocol, closing a connection whose request head is not in within ``REQUEST_HEAD_DEADLINE``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._await_request()

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._stop_waiting()  # a request is in: the app answers it in its own time

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_request()

        def connection_lost(self, exc):
            self._stop_waiting()
            super().connection_lost(exc)

        def _await_request(self):
            self._stop_waiting()
            self._head_deadline = self.loop.call_later(REQUEST_HEAD_DEADLINE, self._head_overdue)

        def _stop_waiting(self):
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_overdue(self):
            self._head_deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _server_class():
    """uvicorn's server, stopping cleanly on Ctrl-C or SIGTERM (exit 0) instead of re-raising the signal after it."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
