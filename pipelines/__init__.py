"""absl entry points composing tfkdp (training, compression) and export (deployment).

Importing this package has no side effects; flags are defined only in the
entry-point modules (`pipelines.compress`).
"""
