"""dmquant's benchmarks: each entry script runs one benchmark and writes its JSON under ``bench/results``.

Entry scripts (``python bench/<name>.py ...`` or ``python -m bench.<name> ...`` from the repository root):
``quality`` (zoo models × recipes × bits), ``speed`` (denoiser latency per model and execution row),
``fidelity`` (converted against simulated models), ``layer_speed``, ``block_kernels``, ``recon_speed``, and
``report``, which writes BENCHMARKS.md from the results. The modules they share: ``common`` (result cells,
the git commit, timing, markdown tables), ``configs`` (the dmquant configurations the benchmarks quantize
with), ``peers`` (torchao and optimum-quanto) and ``speed_*`` (the speed benchmark by job: workloads, rows,
measurement, running, table).
"""
