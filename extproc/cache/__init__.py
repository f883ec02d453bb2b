"""Exact-match response cache: identical calls answered inside the mesh, isolated per service."""
