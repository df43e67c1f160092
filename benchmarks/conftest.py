"""Shared by the benchmark suites: what ran, recorded in ``--benchmark-json`` output.

pytest-benchmark's own machine_info names the CPU but not which BLAS kernel NumPy actually used, how
many threads each pool had, or whether OPENBLAS_CORETYPE held NumPy to older kernels; those decide
the figures as much as the CPU does, so they are added here.
"""


def pytest_benchmark_update_machine_info(config, machine_info):
    from vaecore.benchmark import machine

    info = machine.summary()
    machine_info["vaecore"] = {key: info[key] for key in ("cpu", "cores", "numpy_blas", "blas_architecture",
                                                          "versions", "openblas_overrides", "numba_num_threads")}
    machine_info["threadpool_info"] = info["threadpool_info"]


def pytest_report_header(config):
    from vaecore.benchmark import machine

    lines = [f"cpu: {machine.cpu_model()}, {machine.cores()} cores; NumPy's BLAS: "
             f"{machine.describe_pool(machine.numpy_blas())}"]
    overrides = machine.overrides_set()
    if overrides:
        lines.append("warning: " + " ".join(f"{k}={v}" for k, v in overrides.items()) + " set: NumPy runs older "
                     f"matmul kernels than users' machines do; for comparable figures: {machine.UNSET_COMMAND} ...")
    return lines
