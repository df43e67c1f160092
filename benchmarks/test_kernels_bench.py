"""Each fused CPU kernel against its NumPy reference (for matmul: NumPy's BLAS call; for
layer_backward_adam: the CPU table's plain kernels), at the shapes of the three configurations.

Run (the summary at the end prints reference/cpu ratios of the medians from the same run)::

    .venv/bin/python -m pytest benchmarks/test_kernels_bench.py --benchmark-only \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name

Groups are ``<kernel>[<config>]`` so each kernel's ``cpu`` and ``reference`` rows sit together. The
CPU kernels are warmed (compiled or loaded from the on-disk cache) before timing. Adam runs over the
model's flat parameter count: an MLP encoder 784 -> hidden... -> 2 x latent and a decoder
latent -> reversed hidden... -> 784, weights and biases.
"""

import numpy as np
import pytest

from kernels import REFERENCE, kernel_table

CONFIGS = {  # name: (input, hidden widths, latent, batch), as in DESIGN.md
    "seed-b4": (784, (400,), 200, 4),
    "example-b128": (784, (400,), 20, 128),
    "wide-b512": (784, (1024, 1024), 64, 512),
}
IMPLS = ["reference", "cpu"]


def n_params(n_in, hidden, latent):
    encoder = [n_in, *hidden, 2 * latent]
    decoder = [latent, *reversed(hidden), n_in]
    return sum(a * b + b for layers in (encoder, decoder) for a, b in zip(layers, layers[1:]))


_medians = {}


class _RatioSummary:
    """Prints reference/cpu median ratios per kernel and configuration after the benchmark tables."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        if not _medians:
            return
        write = terminalreporter.write_line
        write("")
        write("reference / cpu, ratio of medians from this run (higher: the fused kernel is faster)")
        write(f"{'kernel':42s}" + "".join(f"{name:>14s}" for name in CONFIGS))
        for kernel in dict.fromkeys(k for k, _, _ in _medians):
            cells = []
            for config in CONFIGS:
                ref, cpu = _medians.get((kernel, config, "reference")), _medians.get((kernel, config, "cpu"))
                cells.append(f"{ref / cpu:13.1f}x" if ref and cpu else f"{'-':>14s}")
            write(f"{kernel:42s}" + "".join(cells))
        write(f"{'(Adam parameters)':42s}" + "".join(f"{n_params(*CONFIGS[c][:3]):>14,d}" for c in CONFIGS))


@pytest.fixture(scope="module", autouse=True)
def ratio_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("kernels-bench-ratios"):
        manager.register(_RatioSummary(), "kernels-bench-ratios")


def run(benchmark, kernel, config, impl, fn, *args, **kwargs):
    table = REFERENCE if impl == "reference" else kernel_table(impl)
    call = getattr(table, fn)
    call(*args, **kwargs)                                      # compile / load from cache, not timed
    benchmark.group = f"{kernel}[{config}]"
    benchmark.extra_info.update(config=config, impl=impl)
    benchmark(call, *args, **kwargs)
    if benchmark.stats is not None:                            # None under --benchmark-disable
        _medians[(kernel, config, impl)] = benchmark.stats.stats.median


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


parametrize = pytest.mark.parametrize
configs = parametrize("config", list(CONFIGS))
impls = parametrize("impl", IMPLS)


@configs
@impls
def test_reparameterize_kl(benchmark, rng, config, impl):
    _, _, latent, batch = CONFIGS[config]
    stats, eps = f32(rng, (batch, 2 * latent)), f32(rng, (batch, latent))
    run(benchmark, "reparameterize_kl", config, impl, "reparameterize_kl", stats, eps, np.empty_like(eps))


@configs
@impls
def test_reparameterize_kl_backward(benchmark, rng, config, impl):
    _, _, latent, batch = CONFIGS[config]
    stats, eps, dz = f32(rng, (batch, 2 * latent)), f32(rng, (batch, latent)), f32(rng, (batch, latent))
    run(benchmark, "reparameterize_kl_backward", config, impl, "reparameterize_kl_backward",
        stats, eps, dz, 1.0, np.empty_like(stats))


@configs
@impls
def test_bernoulli_nll_grad(benchmark, rng, config, impl):
    n_in, _, _, batch = CONFIGS[config]
    logits, x = f32(rng, (batch, n_in), 3.0), rng.random((batch, n_in), dtype=np.float32)
    run(benchmark, "bernoulli_nll_grad", config, impl, "bernoulli_nll_grad", logits, x, 1.0 / batch,
        np.empty_like(logits))


@configs
@impls
def test_gaussian_nll_grad(benchmark, rng, config, impl):
    n_in, _, _, batch = CONFIGS[config]
    mean, x = rng.random((batch, n_in), dtype=np.float32), rng.random((batch, n_in), dtype=np.float32)
    run(benchmark, "gaussian_nll_grad", config, impl, "gaussian_nll_grad", mean, x, -2.0, 1.0 / batch,
        np.empty_like(mean))


@configs
@impls
def test_gaussian_learned_nll_grad(benchmark, rng, config, impl):
    n_in, _, _, batch = CONFIGS[config]
    out = np.concatenate([rng.random((batch, n_in), dtype=np.float32), f32(rng, (batch, n_in))], axis=1)
    x = rng.random((batch, n_in), dtype=np.float32)
    run(benchmark, "gaussian_learned_nll_grad", config, impl, "gaussian_learned_nll_grad", out, x,
        1.0 / batch, np.empty_like(out))


@configs
@impls
@parametrize("clip_norm", [0.0, 1.0], ids=["noclip", "clip"])
def test_adam_step(benchmark, rng, config, impl, clip_norm):
    n_in, hidden, latent, _ = CONFIGS[config]
    n = n_params(n_in, hidden, latent)
    params, grads = f32(rng, n), f32(rng, n, 1e-3)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    benchmark.extra_info["n_params"] = n
    run(benchmark, f"adam_step({'clip' if clip_norm else 'no clip'})", config, impl,
        "adam_step", params, grads, m, v, 10, 1e-3, weight_decay=0.01, clip_norm=clip_norm)


# relu and tanh on the first hidden layer; sigmoid where it is used, on the decoder's 784 outputs
ACTIVATION_WIDTH = {"relu": "hidden", "tanh": "hidden", "sigmoid": "output"}


def _act_shape(config, activation):
    n_in, hidden, _, batch = CONFIGS[config]
    return batch, (hidden[0] if ACTIVATION_WIDTH[activation] == "hidden" else n_in)


@configs
@impls
@parametrize("activation", list(ACTIVATION_WIDTH))
def test_bias_act(benchmark, rng, config, impl, activation):
    shape = _act_shape(config, activation)
    h, bias = f32(rng, shape), f32(rng, shape[1])
    # in place, so every call transforms the last call's output: all three stay finite
    run(benchmark, f"bias_act({activation}, {ACTIVATION_WIDTH[activation]})", config, impl, "bias_act",
        h, bias, activation)


@configs
@impls
@parametrize("activation", list(ACTIVATION_WIDTH))
def test_bias_act_backward(benchmark, rng, config, impl, activation):
    shape = _act_shape(config, activation)
    y = f32(rng, shape)
    REFERENCE.bias_act(y, np.zeros(shape[1], np.float32), activation)
    dy = f32(rng, shape)
    run(benchmark, f"bias_act_backward({activation}, {ACTIVATION_WIDTH[activation]})", config, impl,
        "bias_act_backward",
        dy, y, activation, np.empty_like(dy), np.empty(shape[1], np.float32))


# The first layer's three products (784 x 400, or 784 x 1024 at wide-b512) at each configuration's batch. "reference" here is NumPy's own
# matmul into the buffer (BLAS), which is what the CPU table's matmul replaces at a small batch; at
# batch 128 and 512 the CPU table hands the product to that same call.
PRODUCTS = {
    "x @ W": lambda x, w, d: (x, w, np.empty((x.shape[0], w.shape[1]), np.float32)),
    "x.T @ delta": lambda x, w, d: (x.T, d, np.empty_like(w)),
    "delta @ W.T": lambda x, w, d: (d, w.T, np.empty_like(x)),
}


@configs
@impls
@parametrize("product", list(PRODUCTS))
def test_matmul(benchmark, rng, config, impl, product):
    n_in, hidden, _, batch = CONFIGS[config]
    x, w, d = f32(rng, (batch, n_in)), f32(rng, (n_in, hidden[0])), f32(rng, (batch, hidden[0]))
    a, b, out = PRODUCTS[product](x, w, d)
    call = kernel_table("cpu").matmul if impl == "cpu" else (lambda a, b, out: np.matmul(a, b, out=out))
    call(a, b, out)
    kernel = f"matmul({product}, first layer)"
    benchmark.group = f"{kernel}[{config}]"
    benchmark.extra_info.update(config=config, impl=impl)
    benchmark(call, a, b, out)
    if benchmark.stats is not None:
        _medians[(kernel, config, impl)] = benchmark.stats.stats.median


# The decoder's last layer (hidden -> 784): its weight and data gradients and its Adam update. "cpu" is
# the fused kernel the engine calls layer by layer; "reference" here is the CPU table's plain kernels
# one after the other (its matmul and adam_step), what the engine ran before.
@configs
@parametrize("impl", ["reference", "cpu"])
def test_layer_backward_adam(benchmark, rng, config, impl):
    from kernels.adam import layer_backward_adam_composed

    n_out, hidden, _, batch = CONFIGS[config]
    n_in = hidden[0]
    n = (n_in + 1) * n_out
    params, grads = f32(rng, n), f32(rng, n, 1e-3)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    x, delta, dx = f32(rng, (batch, n_in)), f32(rng, (batch, n_out), 1e-2), np.empty((batch, n_in), np.float32)
    cpu = kernel_table("cpu")
    if impl == "cpu":
        call = cpu.layer_backward_adam
    else:
        def call(*args):
            return layer_backward_adam_composed(cpu.matmul, cpu.adam_step, *args)
    args = (x, delta, params, grads, m, v, (0, n_in, n_out), dx, 10, 1e-3)
    call(*args)
    kernel = "layer_backward_adam(last layer)"
    benchmark.group = f"{kernel}[{config}]"
    benchmark.extra_info.update(config=config, impl=impl, fused=cpu.fuses_layer_adam(batch))
    benchmark(call, *args)
    if benchmark.stats is not None:
        _medians[(kernel, config, impl)] = benchmark.stats.stats.median
