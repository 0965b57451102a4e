"""telepathy: frozen sender LLM -> trainable bridge (Perceiver resampler) -> frozen receiver LLM."""
