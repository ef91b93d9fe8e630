"""Fleet operations: provisioning a secured broker for a fleet (CA and broker certificates,
per-device passwords, ACLs, the mosquitto config) and its ``edgefed broker-config`` command.

Operator-side tooling, apart from what runs in a round: the signing envelope and the signed
downlink stay in ``edgefed.security``. Submodules are imported on use: ``certs``,
``broker_config`` and ``cli`` need the coordinator extra (``cryptography``).
"""
