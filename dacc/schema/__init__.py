"""The contract shared by the compiler and the runtime: plan, manifest, annotations, errors."""
