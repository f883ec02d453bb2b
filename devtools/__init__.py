"""Tools for developing and demonstrating the processor: the local stack (Envoy, processor, mock
providers on 127.0.0.1), the mock AI providers and ``make demo``. Outside the runtime package: the
processor's image does not contain them and the ``extproc`` package never imports them."""
