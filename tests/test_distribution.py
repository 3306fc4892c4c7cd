"""kerascool under the distribution engines Keras 3 uses, against single-device runs.

Method: each engine runs in its own processes (tests/dist_scenarios.py),
because devices are configured before TF or JAX start. There every scenario
trains the same tiny model twice with the same global batches, on one device
and distributed; the oracle is the single-device run. "Correct" means: final
weights, every optimizer variable (hook state included), the logs and what
the feature exposes (averages, captures, multipliers) within 1e-5 of it, the
same number of real updates, the replicas' copies of every variable exactly
equal, and in a multi-process run the same final state, bit for bit, in every
process.

The TensorFlow pass runs the TF engines (MirroredStrategy on 2 logical CPU
devices; MultiWorkerMirroredStrategy on 2 processes, to show where stock fit
fails), the JAX pass the JAX ones (DataParallel on 2 forced host devices; 2
processes on 127.0.0.1 joined by jax.distributed with gloo): each engine needs
its own framework, and running each once keeps CI time flat. The engines'
processes start together when the first test needs them, and run side by side.
"""

import concurrent.futures
import re
import threading
import time

import keras
import pytest

import dist_scenarios as dist

BACKEND = keras.backend.backend()
ENGINES = {"tensorflow": ["tf-mirrored"], "jax": ["jax-dp", "jax-mp"]}.get(BACKEND, [])
TOL = 1e-5
COPIES = {"tf-mirrored": 2, "jax-dp": 2, "jax-mp": 1}  # copies of each variable in one process
TIMEOUT = 600  # seconds for one launch (2 shared cores in CI; normally well under 2 minutes)

FEATURES = list(dist.FEATURES)
_MIRRORED = FEATURES + ["skip_nonfinite", "clipnorm", "checkpoint_all", "unsupported"]
# name -> (engine, scenarios, processes); launches of one engine merge their results.
LAUNCHES = {
    "tensorflow": {
        # two processes of the same engine share the work (Python tracing is single-threaded)
        "mirrored-a": ("tf-mirrored", _MIRRORED[::2], 1),
        "mirrored-b": ("tf-mirrored", _MIRRORED[1::2], 1),
        "multiworker": ("tf-multiworker", ["multiworker"], 2),
    },
    "jax": {
        "dp": ("jax-dp", FEATURES + ["skip_nonfinite", "clipnorm", "checkpoint_all"], 1),
        "mp": ("jax-mp", FEATURES + ["skip_nonfinite", "checkpoint_all"], 2),
    },
}.get(BACKEND, {})

_STOP = threading.Event()
_FUTURES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _stop_launches_at_the_end():
    yield
    _STOP.set()  # launches still running (a test failed early) are killed, not waited for


def _launch(name: str) -> list:
    if not _FUTURES:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(LAUNCHES))
        for key, (engine, scenarios, processes) in LAUNCHES.items():
            _FUTURES[key] = pool.submit(dist.launch_processes, engine, scenarios, TIMEOUT, processes, _STOP)
        pool.shutdown(wait=False)
    try:
        return _FUTURES[name].result()
    except dist.ScenarioError as e:
        raise AssertionError(str(e)) from None


def scenario(engine: str, name: str) -> list:
    """The scenario's result in each process of `engine`."""
    for key, (launch_engine, scenarios, _) in LAUNCHES.items():
        if launch_engine == engine and name in scenarios:
            out = []
            for i, per_process in enumerate(_launch(key)):
                res = per_process[name]
                assert "error" not in res, f"{engine}, process {i}, scenario {name}:\n{res['error']}"
                out.append(res)
            return out
    raise KeyError(f"no launch runs {name} on {engine}")


def assert_parity(res: dict, engine: str, what: str) -> None:
    assert res["moved"], what
    assert res["weights_diff"] <= TOL, (what, res)
    assert res["state_diff"] <= TOL, (what, res)  # every optimizer variable, hook state included
    assert res["history_diff"] <= TOL, (what, res)
    assert res.get("extract_diff", 0.0) <= TOL, (what, res)
    assert res["real_steps"][0] == res["real_steps"][1], (what, res)
    assert res["replica_spread"] == 0.0, (what, res)  # replicas hold the same values
    assert res["copies"] == COPIES[engine], (what, res)


# What each feature shows besides parity: logs, real updates, extracted arrays.
EXPECTED = {
    "clip": dict(logs={"grad_norm", "grad_norm/mlp/hidden", "grad_norm/mlp/out", "skipped_steps"}, steps=8),
    "ema": dict(logs={"val_loss", "val_ema_loss"}, steps=8, extract=4),  # 4 averaged variables
    "swa": dict(logs={"val_loss", "val_swa_loss"}, steps=8, extract=5),  # + the number averaged
    "swa_epoch": dict(steps=12, extract=5),  # epochs 2 and 3 averaged
    "lookahead": dict(steps=8),
    "accumulation": dict(steps=4),  # 12 micro-batches, 3 per update
    "layer_rates": dict(logs={"layer_rate/hidden", "layer_rate/out"}, steps=8, extract=2),
    "sam": dict(steps=8),
    "asam": dict(steps=8),
    "heun": dict(steps=8),
    "capture": dict(extract=2),  # one capture of the hidden layer per epoch
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("feature", FEATURES)
def test_feature_matches_single_device(engine, feature):
    runs = scenario(engine, feature)
    expected = EXPECTED[feature]
    for i, res in enumerate(runs):
        what = f"{feature} on {engine}, process {i}"
        assert_parity(res, engine, what)
        assert expected.get("logs", set()) <= set(res["final_logs"]), (what, res["final_logs"])
        assert res.get("extract_size") == expected.get("extract"), (what, res)
        if "steps" in expected:
            assert res["real_steps"][1] == expected["steps"], (what, res)
    # Every process ends with the same weights and optimizer state, bit for bit.
    assert len({res["digest"] for res in runs}) == 1, feature


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_gradient_on_one_replica_skips_the_step_everywhere(engine):
    # The NaN sits in one replica's part of the batch: after the all-reduce every
    # replica sees it and skips; weights still match the single-device run.
    runs = scenario(engine, "skip_nonfinite")
    for res in runs:
        assert_parity(res, engine, f"skip_nonfinite on {engine}")
        assert res["final_logs"]["skipped_steps"] == 1.0
        assert res["real_steps"] == [3, 3]  # 4 batches, 1 skipped
    assert len({res["digest"] for res in runs}) == 1


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "jax-mp"])
def test_keras_clipnorm_vs_kerascool_clip_by_norm(engine):
    # One SGD(1) step from the same weights: the update is the clipped gradient.
    for res in scenario(engine, "clipnorm"):
        ours, stock = res["kerascool"], res["keras"]
        assert ours["update_diff"] <= 1e-6
        assert ours["dist_norms"] == pytest.approx([0.05] * 4, rel=1e-5)
        assert stock["single_norms"] == pytest.approx([0.05] * 4, rel=1e-5)
        if engine == "tf-mirrored":
            # Keras clips each replica's half gradient before the all-reduce:
            # the update is no longer clipped to 0.05, nor the single-device one.
            assert stock["update_diff"] > 1e-2
            assert min(stock["dist_norms"]) > 0.06
        else:
            # keras.distribution hands the optimizer the global gradient.
            assert stock["update_diff"] <= 1e-6


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_moves_between_distributed_and_single_device(engine):
    # Accumulation (a partial sum at the epoch end), transforms, Lookahead, EMA,
    # layer rates and their scheduler, all at once, through BackupAndRestore.
    for res in scenario(engine, "checkpoint_all"):
        for direction in ("dist_to_single", "single_to_dist"):
            got = res[direction]
            assert got["epochs_after_resume"] == 2, direction  # resumed at epoch 2 of 4
            assert got["weights_diff"] <= TOL, (direction, got)
            assert got["state_diff"] <= TOL, (direction, got)


if BACKEND == "tensorflow":

    @pytest.mark.parametrize(
        "case, match",
        [
            ("steps_per_execution", r"Invalid value for argument `steps_per_execution`.*MirroredStrategy.*"
                                    r"Received: steps_per_execution=2"),
            ("jit_compile", r"Invalid value for argument `jit_compile`.*MirroredStrategy.*Received: jit_compile=True"),
            ("multi_worker", r"MultiWorkerMirroredStrategy.*keras-team/keras#20585.*jax\.distributed\.initialize"),
        ],
    )
    def test_engines_where_stock_fit_fails_raise_a_clear_error(case, match):
        res = scenario("tf-mirrored", "unsupported")[0][case]
        assert res["raised"] == "ValueError", res
        assert re.search(match, res["message"]), res["message"]
        assert res["weights_unchanged"] and res["kerascool_state"] == []  # nothing created, nothing trained

    def test_multi_worker_mirrored_fails_in_stock_keras_fit():
        # Why kerascool refuses MultiWorkerMirroredStrategy (keras-team/keras#20585):
        # 2 workers on loopback, stock fit fails before any callback runs. When
        # this test fails, Keras has fixed it: lift the check in kerascool.distribution.
        for res in _launch("multiworker"):
            res = res["multiworker"]
            assert res["replicas"] == 2
            # With a kerascool callback too: Keras fails before callbacks get the model.
            for run in ("stock", "kerascool"):
                assert res[run]["raised"] == "ValueError", res
                assert "PerReplica" in res[run]["message"]
            # Where kerascool gets the model first (a decoration), its own error says what to do.
            assert res["decorated"]["raised"] == "ValueError", res
            assert re.search(r"MultiWorkerMirroredStrategy.*jax\.distributed\.initialize", res["decorated"]["message"])


if BACKEND == "jax":

    def test_a_dead_process_fails_the_launch_instead_of_hanging():
        start = time.monotonic()
        with pytest.raises(dist.ScenarioError, match="process 1 of 2 exited with code 17") as info:
            dist.launch_processes("jax-mp", ["crash"], TIMEOUT, num_processes=2)
        assert time.monotonic() - start < 120  # well before the time limit
        assert all(p.poll() is not None for p in info.value.processes)  # nothing left running

    def test_a_hanging_launch_is_stopped_at_its_time_limit():
        start = time.monotonic()
        with pytest.raises(dist.ScenarioError, match="still running after 10 s") as info:
            dist.launch_processes("jax-mp", ["hang"], 10, num_processes=2)
        assert time.monotonic() - start < 25
        assert all(p.poll() is not None for p in info.value.processes)
