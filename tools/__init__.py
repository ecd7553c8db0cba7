"""tierserve tooling: build the reference models, assemble and launch tritonserver."""
