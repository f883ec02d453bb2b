"""AI traffic policy for Istio meshes, as an Envoy ext_proc external processor."""

__version__ = "0.1.0"
