;; A library module: no `_start`, one exported function `answer` that calls proc_exit(7).
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "answer") (call $proc_exit (i32.const 7))))
