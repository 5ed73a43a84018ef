;; Never returns: a branch back to the top of a loop.
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $top (br $top))))
