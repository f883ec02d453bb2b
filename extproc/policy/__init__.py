"""Policy model, YAML loading and the compiled, immutable policy set the decision core reads."""
