"""Model plumbing: the frozen decoder run truncated at a layer (models), packed varlen attention with prefix
keys/values (attention), the layouts of a batch of sequences (layout) and the losses (losses)."""
