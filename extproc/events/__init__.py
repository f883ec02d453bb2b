"""Usage events: one ``ai.extproc.v1.UsageEvent`` (protos/) per finished AI call, published to NATS
JetStream and/or appended to a JSONL file, and read back with ``extproc events tail``.

Modules: ``schema`` (CallRecord → event, JSON mapping, trace ids), ``sinks`` (the sinks and
``build_event_sinks``), ``subjects`` (NATS subject and stream names), ``tail`` (the reader behind
the CLI), ``compile_protos`` (regenerates ``gen/``). Nothing is imported here, so that importing
one part does not pull in NATS or protobuf for the others.
"""
