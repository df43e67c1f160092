"""The speed comparison's parts: the reference networks compute our step, the FLOP count, the report.

The PyTorch and JAX tests run when those are installed (skipped with the reason otherwise): from the
same weights and the same noise, each computes the loss, the gradients and the Adam update of our
``Trainer.train_step`` -- so the benchmark compares the same work.
"""

import subprocess
import sys

import numpy as np
import pytest

from vaecore.benchmark import CONFIGS, Unavailable, make_step, report, timing
from vaecore.benchmark import machine
from vaecore.benchmark.ceiling import MatmulCeiling
from vaecore.benchmark.configs import BenchConfig, fixed_images, parse_config_names, step_matmul_flops, \
    step_matmul_shapes
from vaecore.benchmark.ours import OurStep
from vaecore.model import layer_dims

# two hidden layers so the stacks' wiring (and the decoder's mirrored widths) is exercised
TINY = BenchConfig("tiny", input_dim=12, hidden=(5, 4), latent=3, batch=6)


def our_first_step(config, seed=0):
    """Our initial flat params, the noise our first step draws, our gradient there, and the step itself
    after it ran. The gradient comes from the plain backward, which stores every layer's: the step's
    fused kernels need not (``layer_backward_adam``)."""
    ours = OurStep(config, seed=seed)
    initial = ours.model.params.copy()
    # the backend's generator is default_rng(seed); train_step draws the (B, Z) noise from it first
    eps = np.empty((config.batch, config.latent), np.float32)
    ours.backend.normal_into(eps, eps, rng=np.random.default_rng(seed))
    model, ws, scale = ours.model, ours.model.workspace(config.batch), 1.0 / config.batch
    ours.backend.images_into(ws.x, ours.images)
    ws.eps[...] = eps
    model.loss(ws, grad_scale=scale)
    model.backward(ws, kl_weight=1.0, grad_scale=scale)
    grads = model.grads.copy()
    rec, kl, _ = ours.step()
    return ours, initial, eps, (rec + kl) / config.batch, grads


# -- configurations and the matmul count ---------------------------------------------------------

def test_configurations_are_the_design_table():
    table = {name: (c.input_dim, c.hidden, c.latent, c.batch) for name, c in CONFIGS.items()}
    assert table == {"seed-b4": (784, (400,), 200, 4), "example-b128": (784, (400,), 20, 128),
                     "wide-b512": (784, (1024, 1024), 64, 512)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_dims_are_the_engine_model(name):
    config = CONFIGS[name]
    specs, n_encoder = layer_dims(config.model_config())
    assert [(a, b) for a, b, _ in specs] == config.layer_dims() and n_encoder == config.n_encoder


def test_step_flops_of_example_b128_counted_by_hand():
    # layers 784x400, 400x40, 20x400, 400x784; batch 128; forward + weight grad for all four,
    # data grad for all but the first
    weights = 784 * 400 + 400 * 40 + 20 * 400 + 400 * 784
    assert step_matmul_flops(CONFIGS["example-b128"]) == 2 * 128 * (3 * weights - 784 * 400) == 419_840_000


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_flops_formula(name):
    c = CONFIGS[name]
    weights = sum(a * b for a, b in c.layer_dims())
    assert step_matmul_flops(c) == 2 * c.batch * (3 * weights - c.input_dim * c.hidden[0])
    assert len(step_matmul_shapes(c)) == 3 * len(c.layer_dims()) - 1


def test_ceiling_runs_every_matmul_of_the_step_in_the_engine_layout():
    ceiling = MatmulCeiling(TINY)
    ceiling.step()
    for shape, (a, b, c) in zip(ceiling.shapes, ceiling.operands):
        assert a.shape == (shape.m, shape.k) and b.shape == (shape.k, shape.n)
        assert a.flags.f_contiguous == shape.a_transposed or shape.m == 1
        np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
    assert ceiling.gflops(1.0) == pytest.approx(step_matmul_flops(TINY) / 1e9)


def test_parse_config_names():
    assert parse_config_names("wide-b512, seed-b4,wide-b512") == ("wide-b512", "seed-b4")
    with pytest.raises(ValueError, match="'b9'"):
        parse_config_names("seed-b4,b9")


def test_fixed_images_are_uint8_and_repeatable():
    a, b = fixed_images(CONFIGS["seed-b4"]), fixed_images(CONFIGS["seed-b4"])
    assert a.dtype == np.uint8 and a.shape == (4, 784) and np.array_equal(a, b)


def test_our_step_trains():
    ours = OurStep(TINY)
    before = ours.model.params.copy()
    rec, kl, norm = ours.step()
    assert np.isfinite(rec + kl + norm) and not np.array_equal(before, ours.model.params)


# -- PyTorch and JAX compute our step --------------------------------------------------------------

def test_torch_reference_computes_our_loss_gradients_and_adam_update():
    pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")
    import torch

    from vaecore.benchmark.torch_reference import TorchStep, to_flat

    ours, initial, eps, our_loss, our_grads = our_first_step(TINY)
    ref = TorchStep(TINY, flat_params=initial, threads=1)
    np.testing.assert_array_equal(to_flat(ref.module), initial)
    loss = ref.step(eps=torch.from_numpy(eps))
    assert float(loss) == pytest.approx(float(our_loss), rel=1e-5)
    np.testing.assert_allclose(to_flat(ref.module, grads=True), our_grads, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(to_flat(ref.module), ours.model.params, rtol=0, atol=2e-6)


def test_jax_reference_computes_our_loss_gradients_and_adam_update():
    pytest.importorskip("jax", reason="JAX is not installed (pip install jax)")
    import jax
    import jax.numpy as jnp

    from vaecore.benchmark.jax_reference import JaxStep, params_from_flat, to_flat

    ours, initial, eps, our_loss, our_grads = our_first_step(TINY)
    ref = JaxStep(TINY, flat_params=initial)
    np.testing.assert_array_equal(to_flat(ref.params), initial)
    (value, _), grads = jax.value_and_grad(ref.loss, has_aux=True)(params_from_flat(TINY, initial), ref.x,
                                                                   jnp.asarray(eps))
    assert float(value) == pytest.approx(float(our_loss), rel=1e-5)
    np.testing.assert_allclose(to_flat(grads), our_grads, rtol=1e-4, atol=1e-6)
    loss = ref.step(eps=jnp.asarray(eps))
    assert float(loss) == pytest.approx(float(our_loss), rel=1e-5)
    np.testing.assert_allclose(to_flat(ref.params), ours.model.params, rtol=0, atol=2e-6)


@pytest.mark.parametrize("impl", ["torch", "jax"])
def test_reference_steps_draw_fresh_noise_and_train(impl):
    pytest.importorskip(impl, reason=f"{impl} is not installed")
    step = make_step(impl, TINY)
    losses = [float(step()) for _ in range(3)]
    assert all(np.isfinite(losses)) and len(set(losses)) == 3     # new noise and new weights each step


@pytest.mark.parametrize("impl, module", [("torch-cuda", "torch"), ("jax-gpu", "jax")])
def test_gpu_references_run_on_the_gpu_or_say_why_not(impl, module):
    pytest.importorskip(module, reason=f"{module} is not installed")
    try:
        step = make_step(impl, TINY)
    except Unavailable as e:              # a CPU build, or no GPU: the reason names the device
        assert "GPU" in str(e) or "CUDA" in str(e)
        return
    assert step.name == impl
    losses = [float(step()) for _ in range(2)]
    assert all(np.isfinite(losses)) and losses[0] != losses[1]


def test_importing_the_benchmark_package_imports_neither_torch_nor_jax():
    code = ("import sys, vaecore.benchmark.report, vaecore.benchmark.torch_reference, "
            "vaecore.benchmark.jax_reference; print(sorted({'torch', 'jax'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_torch_and_jax_are_not_dependencies():
    from importlib import metadata

    requires = " ".join(metadata.requires("vaecore") or [])
    assert "torch" not in requires and "jax" not in requires


def test_missing_reference_is_unavailable_with_install_hint(monkeypatch):
    import vaecore.benchmark.torch_reference as torch_reference

    monkeypatch.setitem(sys.modules, "torch", None)            # import torch -> ImportError
    usable, why = torch_reference.status()
    assert not usable and "pip install torch==2.13.0" in why
    with pytest.raises(Unavailable, match="pip install torch"):
        make_step("torch", TINY)


def test_cupy_without_a_device_is_unavailable(monkeypatch):
    import vaecore.backend

    monkeypatch.setattr(vaecore.backend, "cupy_status", lambda: (False, "no CUDA device"))
    with pytest.raises(Unavailable, match="no CUDA device"):
        make_step("ours-cupy", TINY)
    assert report.resolve_backend("auto") == "numpy"


# -- timing and the report ----------------------------------------------------------------------------

def test_summarize_takes_median_and_quartiles():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.q1, t.q3, t.calls) == (3.0, 2.0, 4.0, 5) and t.per_second == pytest.approx(1 / 3)


def fake_result(name, ours, torch=None, jax=None, ceiling=None, ours_impl="ours-numpy"):
    t = lambda s: None if s is None else timing.Timing(s, s, s, 10)   # noqa: E731
    refs = {k: t(v) for k, v in (("torch", torch), ("jax", jax)) if v is not None}
    return report.ConfigResult(CONFIGS[name], ours_impl, t(ours), refs, t(ceiling))


def test_ratio_is_against_the_faster_reference_and_share_is_ceiling_over_ours():
    r = fake_result("example-b128", ours=0.002, torch=0.008, jax=0.004, ceiling=0.0015)
    assert r.faster_reference()[0] == "jax"
    assert r.ratio() == pytest.approx(2.0)
    assert r.ceiling_share() == pytest.approx(0.75)
    assert r.matmul_gflops() == pytest.approx(419_840_000 / 0.0015 / 1e9)


def test_table_shows_rates_ratios_targets_and_ceiling_share():
    table = report.format_table([fake_result("seed-b4", ours=0.0005, torch=0.001, jax=0.002, ceiling=0.0001),
                                 fake_result("wide-b512", ours=0.05, jax=0.04, ceiling=0.045)])
    seed_row = next(line for line in table.splitlines() if line.startswith("seed-b4"))
    wide_row = next(line for line in table.splitlines() if line.startswith("wide-b512"))
    assert "2,000" in seed_row and "1,000" in seed_row and "2.00x (torch)" in seed_row and "3.0x low" in seed_row
    assert "20%" in seed_row
    assert "20.0" in wide_row and "25.0" in wide_row and "0.80x (jax)" in wide_row and "1.1x low" in wide_row
    assert " - " in wide_row                                     # no torch figure
    assert "90% (>= 80% ok)" in wide_row


def test_a_gpu_table_names_the_gpu_references_and_sets_no_target():
    table = report.format_table([fake_result("wide-b512", ours=0.004, torch=0.002, jax=0.0005, ceiling=0.0005,
                                             ours_impl="ours-cupy")])
    head = next(line for line in table.splitlines() if line.startswith("config"))
    row = next(line for line in table.splitlines() if line.startswith("wide-b512"))
    assert "ours-cupy" in head and "torch-cuda" in head and "jax-gpu" in head
    assert "0.12x (jax)" in row and "low" not in row and "ok" not in row and "12%" in row
    assert "cupy.matmul (cuBLAS)" in table and "none is set for a GPU" in table


def test_notes_name_missing_frameworks_and_how_to_install_them():
    comparison = report.Comparison([], {"torch": "PyTorch is not installed (pip install torch==2.13.0)",
                                        "jax": "JAX failed to import: boom"}, {"cores": 2}, 0.05)
    notes = report.format_notes(comparison)
    assert "torch: not compared -- PyTorch is not installed (pip install torch==2.13.0)" in notes
    assert "jax: not compared -- JAX failed to import: boom; to compare: pip install jax" in notes
    assert "busy" not in notes
    assert "1.5 of the 2 cores busy" in report.format_notes(report.Comparison([], {}, {"cores": 2}, 1.5))


def test_notes_say_how_ours_ran_once_timed():
    results = [fake_result(name, ours=0.001, ceiling=0.001) for name in ("seed-b4", "example-b128", "wide-b512")]
    results[0].ours_ran = results[1].ours_ran = "vaecore numpy, replayed"
    results[2].ours_ran = "vaecore numpy"
    notes = report.format_notes(report.Comparison(results, {}, {"cores": 2}, 0.0)).splitlines()
    assert notes == ["ours ran as vaecore numpy, replayed: seed-b4, example-b128", "ours ran as vaecore numpy: wide-b512"]


def test_override_warning_only_when_openblas_coretype_is_set(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    warning = machine.override_warning()
    assert "OPENBLAS_CORETYPE=Haswell" in warning and "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in warning
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    assert machine.override_warning() is None


def test_other_load_does_not_count_our_own_work():
    meter = machine.OtherLoad().start()
    np.linalg.eigvalsh(np.random.default_rng(0).standard_normal((600, 600)))     # keep ourselves busy
    others = meter.stop()
    assert others is None or others >= 0.0


def test_machine_summary_names_cpu_cores_and_blas():
    info = machine.summary()
    assert info["cpu"] and info["cores"] >= 1 and info["versions"]["numpy"] == np.__version__
    assert "threads" in info["numpy_blas"]


def test_compare_runs_end_to_end_on_a_tiny_network():
    comparison = report.compare([TINY], seconds=0.02, references=())
    (result,) = comparison.results
    assert result.ours.median > 0 and result.ceiling.median > 0 and result.ratio() is None
    text = report.format_report(comparison)
    assert "tiny" in text and "machine:" in text and "NumPy's BLAS:" in text


@pytest.mark.parametrize("fast", [True, False])
def test_threads_note_says_whether_the_parallel_kernels_take_every_core(monkeypatch, fast):
    """Under the workqueue layer or with one thread, Adam and the small-batch kernels run serially,
    and the bench's table must not claim otherwise."""
    import kernels.cpu
    from vaecore.benchmark.ours import threads_note

    monkeypatch.setattr(kernels.cpu, "_pool_is_fast", lambda: fast)
    monkeypatch.setattr(kernels.cpu, "get_num_threads", lambda: 2)
    note = threads_note()
    assert ("Adam and those kernels on Numba's" in note) == fast
    assert ("Adam and those kernels on one thread" in note) == (not fast)


def test_cuda_kernels_that_fail_to_compile_are_a_one_line_error():
    """A Numba CUDA target that cannot compile here (numba-cuda 0.30.4 under NumPy 2.5 on an H200) is
    found when the backend is made, not at the first training step."""
    import types

    import vaecore.backend
    from vaecore.errors import VaecoreError

    def bias_act(h, bias, activation):
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    fake_cupy = types.SimpleNamespace(zeros=np.zeros, float32=np.float32)
    with pytest.raises(VaecoreError, match=r"--backend cupy: the CUDA kernels do not compile or run here "
                                           r"\(AttributeError: module 'numpy' has no attribute 'row_stack'; .*NumPy"):
        vaecore.backend._probe_cuda_kernels(types.SimpleNamespace(bias_act=bias_act), fake_cupy)
