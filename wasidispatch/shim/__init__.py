"""The engine-agnostic containerd shim toolkit."""
