"""The decode engine: the KV cache, the decode step (decode, static_decode), the generation loop
(generation), token choice (sampling), the certified LM head (lm_head), the packed CPU kernels (kernels),
the host-sync counter (syncs), the options generate() takes for the engine (options), and the statistics
a speculative run reports in its result (speculative_stats).

May import calm.errors, calm.adapters and calm.exits."""
