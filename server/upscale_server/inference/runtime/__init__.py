"""The runtime: the worker that owns the device, cross-request batching, devices and compute settings."""
