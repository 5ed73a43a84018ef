;; A WASI preview 2 command component whose wasi:cli/run returns err (exit status 1).
(component
  (core module $main
    ;; result<_, _>: 1 is err
    (func (export "run") (result i32) (i32.const 1)))
  (core instance $main-instance (instantiate $main))
  (func $run (result (result)) (canon lift (core func $main-instance "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance)))
