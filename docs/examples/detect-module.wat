;; A WebAssembly core module (WASI command): `make demo` builds it with wasmtime.wat2wasm and
;; shows that wasidispatch detects both this text and the binary it becomes.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from a Wasm module\n")
  (func (export "_start")
    ;; iovec at 0: pointer 16, length 25
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 25))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
)
