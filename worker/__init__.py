"""The worker process: model weights, the paged KV cache, the model runner and the sampler."""
