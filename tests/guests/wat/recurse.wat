;; Recurses without end: a stack overflow trap.
(module
  (memory (export "memory") 1)
  (func $down (export "_start") (call $down)))
