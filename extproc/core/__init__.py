"""The decision core: plain Python, no gRPC. identify caller → resolve policy → decide → mutations."""
