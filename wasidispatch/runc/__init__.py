"""``wasidispatch-runc``: a runc-compatible runtime command that runs Wasm containers itself.

containerd's stock ``io.containerd.runc.v2`` shim runs any binary with runc's command line
(``options.BinaryName``). This package is that binary: at ``create`` it applies the dispatch
rule to the bundle; a Linux container is handed to the real ``runc`` unchanged (same
arguments, same descriptors, ``exec`` so the exit status is runc's own), a Wasm container is
run by a process of ours that the shim supervises like a container's init. See
``docs/kubernetes.md``.

Each call is a fresh interpreter, so the modules here import only what a subcommand needs:
``state``, ``kill`` and ``delete`` of a Wasm container read a small JSON file and ``/proc``.
"""
