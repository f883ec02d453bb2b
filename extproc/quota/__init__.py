"""Request, token and cost quotas: plan which counters a call touches, admit against them, settle."""
