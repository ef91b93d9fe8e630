"""Signed downlink for the runtime: the coordinator signs, each agent verifies (torch-free).

Two small objects over :mod:`edgefed.security.envelope` so the coordinator and the agent need
one line each::

    signer = DownlinkSigner(load_signing_key("coordinator.key"), topics)     # coordinator
    client.publish(topics.task(dev), signer.sign(topics.task(dev), payload, rnd))

    verifier = DownlinkVerifier([load_verify_key("coordinator.key.pub")])    # agent
    payload, rnd = verifier.open(msg.topic, msg.payload)                      # EnvelopeError

The context is the topic the message arrived on (a task for dev-1 never verifies on dev-2's
topic, a bundle never as weights); the sequence is the round. The verifier keeps the highest
round accepted per topic and refuses anything older (a replayed old model), while the same
round again is accepted (a retained round announcement is re-delivered after every reconnect;
the agent's own round logic ignores a task it already finished). Persist :meth:`state` with
the agent's state so a restart does not reopen the replay window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nacl.signing import SigningKey, VerifyKey

from edgefed.security.envelope import EnvelopeError, downlink_context, open_envelope, sign_payload


class DownlinkSigner:
    def __init__(self, signing_key: SigningKey, purpose: str = "downlink") -> None:
        self._key = signing_key
        self.purpose = purpose

    def sign(self, topic: str, payload: bytes, rnd: int) -> bytes:
        return sign_payload(
            payload, self._key, context=downlink_context(topic, self.purpose), seq=rnd
        )


class DownlinkVerifier:
    def __init__(
        self, verify_keys: Iterable[VerifyKey] | VerifyKey, purpose: str = "downlink"
    ) -> None:
        keys = [verify_keys] if isinstance(verify_keys, VerifyKey) else list(verify_keys)
        if not keys:
            raise EnvelopeError("no_keys", "the agent has no coordinator key configured")
        self._keys = keys
        self.purpose = purpose
        self._last: dict[str, int] = {}

    def open(self, topic: str, signed: bytes) -> tuple[bytes, int]:
        """Verified payload and its round; raises EnvelopeError (with ``reason``) otherwise."""
        opened = open_envelope(
            signed,
            self._keys,
            context=downlink_context(topic, self.purpose),
            min_seq=self._last.get(topic),
        )
        self._last[topic] = max(opened.seq, self._last.get(topic, 0))
        return opened.payload, opened.seq

    def state(self) -> dict[str, int]:
        return dict(self._last)

    def load_state(self, state: Mapping[str, int]) -> None:
        if not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in state.items()):
            raise EnvelopeError("bad_state", "downlink verifier state must map topic -> round")
        self._last = dict(state)
