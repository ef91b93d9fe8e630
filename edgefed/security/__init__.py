"""Runtime security: the signing envelope and the signed downlink (plus the update norm
bound, an aggregation defence). Torch-free and safe on devices.

Broker provisioning (certificates, passwords, ACLs, the mosquitto config) is operator
tooling and lives in ``edgefed.fleetops``.
"""
