"""Inference: network architectures, weight loading and provisioning (torch only, no web framework)."""
