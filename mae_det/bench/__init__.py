"""Speed benchmarks (pretraining step, detection backbone and iteration): applications above engine/ and modeling/."""
