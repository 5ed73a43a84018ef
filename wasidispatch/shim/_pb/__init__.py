"""Generated protobuf modules (``python -m wasidispatch.shim._build``); do not edit."""
