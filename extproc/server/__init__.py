"""The thin gRPC layer: Envoy's ext_proc protocol in, decision-core calls, ext_proc responses out."""
