"""Envoy configuration rendered from one definition of our ext_proc filter.

``filter.py`` is that definition; ``bootstrap.py`` wraps it into a standalone sidecar bootstrap
(``envoy/`` and the demo/tests), and the Istio EnvoyFilter is rendered from the same function.
"""
