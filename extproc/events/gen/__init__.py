"""Generated protobuf code for protos/ (see extproc/events/compile_protos.py). Do not edit."""
