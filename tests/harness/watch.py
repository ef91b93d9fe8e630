"""A plain paho subscriber: the test's own eyes on the broker."""

from __future__ import annotations


class Watcher:
    """A plain paho subscriber that records (topic, logical payload) of single-frame
    messages (frame header stripped) - the test's own eyes on the broker."""

    def __init__(self, url: str, topics: list[str]) -> None:
        import threading

        import paho.mqtt.client as mqtt

        from edgefed.transport.chunking import HEADER_SIZE

        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{id(self)}")

        def on_connect(c, u, f, rc, p) -> None:  # type: ignore[no-untyped-def]
            for t in topics:
                c.subscribe(t, qos=1)

        def on_message(c, u, msg) -> None:  # type: ignore[no-untyped-def]
            with self._cond:
                self.messages.append((msg.topic, bytes(msg.payload[HEADER_SIZE:])))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(host, int(port), 30)
        self.client.loop_start()

    def wait_for(self, pred, timeout: float) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.messages), timeout):
                raise TimeoutError(f"condition not met in {timeout}s; saw {len(self.messages)}")
            return list(self.messages)

    def json(self, topic_suffix: str) -> list[dict[str, object]]:
        import json

        with self._cond:
            return [json.loads(p) for t, p in self.messages if t.endswith(topic_suffix) and p]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
