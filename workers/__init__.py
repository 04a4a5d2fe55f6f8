"""Model workers: EvoEmbedding wrapper, per-conversation state, scheduler, runner, engine."""
