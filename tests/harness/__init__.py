"""The test harness: real brokers, real processes and the shared demo models, in one module
per job (tests/conftest.py only registers the fixtures from :mod:`harness.fixtures`).

- :mod:`harness.wait`: ``wait_until``, the one way a test waits (a condition and a deadline).
- :mod:`harness.net`: free loopback ports, waiting for a listener.
- :mod:`harness.broker`: mosquitto (plain and secured by ``edgefed broker-config``).
- :mod:`harness.watch`: a plain paho subscriber, the test's own eyes on the broker.
- :mod:`harness.models`: the demo MLP exported once per session, synthetic data sets.
- :mod:`harness.processes`: coordinator + agents as real subprocesses; stopping workers.
- :mod:`harness.inproc`: coordinator + agents as threads of the test process.
"""
