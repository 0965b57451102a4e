"""telepathy's launcher: CLI -> plan -> submission -> node entry -> torchrun workers.

Nothing in this package imports torch or transformers at module level: planning and --dry-run stay fast.
"""
