"""The upload protocol, above the hook's I/O: see :mod:`cliniko_provider.protocol.upload`."""
