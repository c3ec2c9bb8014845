"""trimode's benchmarks, beside the runtime: each module is a `python -m bench.<name>` command that measures one thing.

- `bench.offline`: offline throughput by mode and batch size against transformers' `generate` (`trimode bench`);
- `bench.forwards`: what one forward of each kind costs, and the acceptance a mode needs to win;
- `bench.kernels`: the model's glue ops, eager against the fused CPU kernels;
- `bench.linear`: the CPU linear kernels side by side on a model's weight shapes.

The serving benchmarks (load generator, suite) live in `loadtest`.
"""
