"""flext-sidecar: hosts an app's ServiceProcessors beside it and calls the mesh for it."""
