"""An embedded MQTT broker (amqtt, in-process) for the demo, simulations and tests.

Why amqtt: it is pure Python, so ``edgefed demo`` needs no system package. It speaks MQTT
3.1.1 only (our client falls back automatically) and is ~4x slower than mosquitto (see
shared baselines), which is fine for tens of devices. It binds 127.0.0.1 only: the amqtt
default is 0.0.0.0:1883, which would expose an unauthenticated broker to the network.

The broker runs its own asyncio loop in a daemon thread, so callers stay synchronous.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from types import TracebackType

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race is accepted)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """amqtt broker on ``host:port`` (port 0 = pick a free one), started by :meth:`start`.

    Use as a context manager; :attr:`url` is what clients connect to.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Persistent sessions must survive a device's reconnect within a round.
            "session_expiry_interval": 3600,
            "plugins": {
                # allow_anonymous=False: amqtt keeps no offline QoS 1 messages for anonymous
                # sessions, so clients must send a username (any; our client sends its id).
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False},
            },
        }

    def _run(self) -> None:
        from amqtt.broker import Broker  # imported here: amqtt is a coordinator-side extra

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._broker = Broker(self._config(), loop=loop)
            loop.run_until_complete(self._broker.start())
        except BaseException as e:  # report start failures to the caller thread
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._broker.shutdown())
            loop.close()

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        # amqtt logs every connect at INFO and tracebacks of clients that vanish at WARNING.
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="edgefed-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"embedded broker did not start within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"embedded broker failed to start: {self._error}") from self._error
        log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) on %s", self.url)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
