"""Demo models and data sets (torch / scikit-learn side): the reference models of the
tests, benchmarks and demo, the digits federated splits and the 28x28 noisy-digits task.
The library itself never depends on them; a user brings their own model and data."""
