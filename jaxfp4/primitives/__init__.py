"""One JAX primitive per op family: abstract eval, per-platform lowering to the
FFI targets (or to the pure-JAX reference where none exists) and a batching
rule, side by side in one file each."""
