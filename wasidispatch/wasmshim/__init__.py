"""containerd-shim-wasidispatch-v1: the wasidispatch shim, built on `wasidispatch.shim`."""
