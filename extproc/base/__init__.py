"""What every layer shares: the AI APIs' endpoints and error envelopes, the wire contract between Envoy
and the processor's parts, signed tokens, and back-off from a dependency's outage."""
