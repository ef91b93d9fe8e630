"""Fleet security: broker TLS/ACL set-up, signed downlink, update norm bounding.

Submodules are imported on use: ``certs``/``broker_config``/``cli`` need the coordinator
extra (``cryptography``); ``envelope``, ``norm_bound``, ``passwords`` and ``acl`` are
torch-free and safe on devices.
"""
