"""Gradient transforms through `fit`, each against a NumPy oracle.

Method: with SGD(learning_rate=1) and one full batch, the applied update is
minus the gradient that reached the optimizer. A stock run from the same
initial weights gives the raw gradient; the NumPy transform of it must equal
the update applied with the transform on.
"""

import keras
import numpy as np
import pytest
from helpers import regression_data, tiny_mlp, weights_of

import kerascool

X, Y = regression_data(n=16, inputs=4, outputs=2)


def _model(optimizer=None, **compile_kwargs):
    keras.utils.set_random_seed(7)
    model = tiny_mlp(inputs=4, hidden=5, outputs=2)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate=1.0), loss="mse", **compile_kwargs)
    return model


def _one_step(callbacks=(), x=X, y=Y):
    model = _model()
    w0 = weights_of(model)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False, callbacks=list(callbacks))
    return model, [a - b for a, b in zip(w0, weights_of(model))]  # = gradient seen by SGD(lr=1)


RAW = None


def raw_grads():
    global RAW
    if RAW is None:
        RAW = _one_step()[1]
    return RAW


# paths of tiny_mlp's variables, in order: hidden/kernel, hidden/bias, out/kernel, out/bias
LAYER = [0, 0, 1, 1]


def _np_scale(grads, norm, max_norm):
    return [g * min(1.0, max_norm / max(norm, 1e-12)) for g in grads]


def test_clip_by_norm_per_variable():
    _, got = _one_step([kerascool.GradientTransform(kerascool.ClipByNorm(0.05))])
    want = [_np_scale([g], np.linalg.norm(g), 0.05)[0] for g in raw_grads()]
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
        assert np.linalg.norm(g) <= 0.05 + 1e-6  # invariant: clipped norm <= threshold


def test_clip_by_layer_norm_shares_one_norm_per_layer():
    raw = raw_grads()
    _, got = _one_step([kerascool.GradientTransform(kerascool.ClipByLayerNorm(0.05))])
    for layer in (0, 1):
        idx = [i for i, l in enumerate(LAYER) if l == layer]
        norm = np.sqrt(sum(np.sum(raw[i] ** 2) for i in idx))
        want = _np_scale([raw[i] for i in idx], norm, 0.05)
        for i, w in zip(idx, want):
            np.testing.assert_allclose(got[i], w, rtol=1e-5, atol=1e-7)
        assert np.sqrt(sum(np.sum(got[i] ** 2) for i in idx)) == pytest.approx(min(norm, 0.05), rel=1e-5)


def test_clip_by_global_norm():
    raw = raw_grads()
    norm = np.sqrt(sum(np.sum(g**2) for g in raw))
    _, got = _one_step([kerascool.GradientTransform(kerascool.ClipByGlobalNorm(norm / 3))])
    for g, w in zip(got, _np_scale(raw, norm, norm / 3)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_clip_by_value_and_scale_compose_in_order():
    raw = raw_grads()
    limit = float(np.median(np.abs(np.concatenate([g.ravel() for g in raw]))))
    _, got = _one_step([kerascool.GradientTransform(kerascool.ClipByValue(limit), kerascool.Scale(0.5))])
    for g, r in zip(got, raw):
        np.testing.assert_allclose(g, 0.5 * np.clip(r, -limit, limit), rtol=1e-5, atol=1e-7)
    # the other order clips the halved gradient: a different, equally predictable answer
    _, got = _one_step([kerascool.GradientTransform(kerascool.Scale(0.5), kerascool.ClipByValue(limit))])
    for g, r in zip(got, raw):
        np.testing.assert_allclose(g, np.clip(0.5 * r, -limit, limit), rtol=1e-5, atol=1e-7)


def test_adaptive_clip_equals_its_formula():
    raw = raw_grads()
    w0 = weights_of(_model())
    clipping, eps = 0.01, 1e-3

    def unitwise(x):
        return np.sqrt(np.sum(x**2)) if x.ndim <= 1 else np.sqrt(np.sum(x**2, axis=tuple(range(x.ndim - 1)), keepdims=True))

    want = []
    for g, w in zip(raw, w0):
        max_norm = np.maximum(unitwise(w), eps) * clipping
        gn = unitwise(g)
        want.append(g * np.where(gn > max_norm, max_norm / np.maximum(gn, 1e-6), 1.0))
    _, got = _one_step([kerascool.GradientTransform(kerascool.AdaptiveClip(clipping, eps))])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(w, r) for w, r in zip(want, raw))  # the case really clips


def test_masked_transform_leaves_other_layers_untouched():
    raw = raw_grads()
    _, got = _one_step([kerascool.GradientTransform(kerascool.masked(kerascool.ClipByGlobalNorm(1e-3), "hidden"))])
    np.testing.assert_allclose(got[2], raw[2], rtol=1e-6)  # out/kernel: untouched
    np.testing.assert_allclose(got[3], raw[3], rtol=1e-6)
    hidden_norm = np.sqrt(np.sum(got[0] ** 2) + np.sum(got[1] ** 2))
    assert hidden_norm == pytest.approx(1e-3, rel=1e-4)


def test_masked_by_predicate_and_lambda():
    raw = raw_grads()
    only_biases = kerascool.masked(kerascool.Lambda(lambda gs, vs: [g * 0.0 for g in gs]), lambda v: v.path.endswith("bias"))
    _, got = _one_step([kerascool.GradientTransform(only_biases)])
    np.testing.assert_array_equal(got[1], 0)
    np.testing.assert_array_equal(got[3], 0)
    np.testing.assert_allclose(got[0], raw[0], rtol=1e-6)


def test_skip_non_finite_keeps_weights_and_optimizer_state_bit_identical():
    x = np.concatenate([X, X, X])
    x[16 + 3, 1] = np.nan  # the second batch of three holds a NaN
    y = np.concatenate([Y, Y, Y])
    model = _model(optimizer=keras.optimizers.Adam(0.01))
    snaps = []

    class Snap(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            snaps.append((weights_of(self.model), [np.array(v) for v in self.model.optimizer.variables]))

    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                        callbacks=[kerascool.GradientTransform(kerascool.SkipNonFinite()), Snap()])
    (w1, o1), (w2, o2), (w3, _) = snaps
    # weights and Adam moments/iterations unchanged by the NaN step (our own counters aside)
    own = [i for i, v in enumerate(model.optimizer.variables) if "kerascool" in v.path]
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    for i, (a, b) in enumerate(zip(o1, o2)):
        if i not in own:
            np.testing.assert_array_equal(a, b)
    assert history.history["skipped_steps"][-1] == 1
    assert all(np.isfinite(w).all() for w in w3) and not np.array_equal(w3[0], w2[0])  # training went on
    assert kerascool.real_steps(model) == 2


def test_trace_count_is_one_per_fit_and_a_second_fit_works():
    traces = []

    def spy(grads, variables):
        traces.append(1)  # Python in a transform runs only while tracing
        return grads

    model = _model()
    cb = kerascool.GradientTransform(kerascool.Lambda(spy), kerascool.ClipByGlobalNorm(0.01))
    model.fit(X, Y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    assert len(traces) == 1
    w = weights_of(model)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert len(traces) == 1  # the same hooks: fit reuses the compiled step
    assert kerascool.real_steps(model) == 12  # 16/4 batches x 3 epochs
    cb = kerascool.GradientTransform(kerascool.Lambda(spy), kerascool.ClipByGlobalNorm(0.01))
    model.fit(X, Y, batch_size=4, epochs=0, verbose=0, callbacks=[cb])  # a new instance: traced anew
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert len(traces) == 2
    # each step moved the weights by at most the clip norm
    assert np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(w, weights_of(model)))) <= 8 * 0.01 + 1e-6
    # a later stock fit runs without the hook
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert len(traces) == 2 and kerascool.real_steps(model) == 16


def test_steps_per_execution_gives_the_same_weights():
    results = []
    for spe in (1, 4):
        model = _model(steps_per_execution=spe)
        model.fit(X, Y, batch_size=2, epochs=1, shuffle=False, verbose=0,
                  callbacks=[kerascool.GradientTransform(kerascool.ClipByLayerNorm(0.05))])
        results.append(weights_of(model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_jit_compile_matches_oracle():
    model = _model(jit_compile=True)
    w0 = weights_of(model)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[kerascool.GradientTransform(kerascool.ClipByNorm(0.05))])
    got = [a - b for a, b in zip(w0, weights_of(model))]
    want = [_np_scale([g], np.linalg.norm(g), 0.05)[0] for g in raw_grads()]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_mixed_precision_hooks_see_unscaled_gradients():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        w0 = weights_of(model)
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[kerascool.GradientTransform(kerascool.ClipByGlobalNorm(0.01))])
        step = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(w0, weights_of(model))))
        # scaled gradients would have been clipped to 0.01 and then divided by the loss scale
        assert step == pytest.approx(0.01, rel=1e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_evaluate_and_predict_are_unaffected():
    model = _model()
    stock = _model()
    cb = kerascool.GradientTransform(kerascool.ClipByNorm(1e-4))
    assert model.evaluate(X, Y, verbose=0, callbacks=[cb]) == pytest.approx(stock.evaluate(X, Y, verbose=0), rel=1e-6)
    np.testing.assert_allclose(model.predict(X, verbose=0, callbacks=[cb]), stock.predict(X, verbose=0), rtol=1e-6)


def test_install_and_remove_are_idempotent():
    from kerascool import _core

    model = _model()
    installation = _core.installation_of(model)
    h = _core.StepHook()
    installation.decorate(h)
    installation.decorate(h)
    assert installation.hooks.count(h) == 1
    installation.undecorate(h)
    installation.undecorate(h)
    assert h not in installation.hooks


# -- misuse: clear errors before training, model unchanged ---------------------


def test_pattern_matching_nothing_raises_before_training_with_model_unchanged():
    model = _model()
    w0, n_opt = weights_of(model), len(model.optimizer.variables)
    cb = kerascool.GradientTransform(kerascool.masked(kerascool.ClipByNorm(1.0), "encoder"))
    with pytest.raises(ValueError, match="matches no variable.*mlp/hidden/kernel"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[cb])
    for a, b in zip(w0, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    assert len(model.optimizer.variables) == n_opt


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1"])
def test_non_positive_norm_is_rejected(bad):
    with pytest.raises(ValueError, match="Invalid value for argument `max_norm`"):
        kerascool.ClipByNorm(bad)
    with pytest.raises(ValueError, match="Invalid value for argument `max_norm`"):
        kerascool.ClipByLayerNorm(bad)


def test_non_transformation_is_rejected():
    with pytest.raises(TypeError, match="Lambda"):
        kerascool.GradientTransform(lambda g, v: g)
    with pytest.raises(TypeError, match="callable"):
        kerascool.Lambda(3)
    with pytest.raises(ValueError, match="at least one"):
        kerascool.GradientTransform()
    with pytest.raises(ValueError, match="log_norms"):
        kerascool.GradientTransform(kerascool.Scale(1.0), log_norms="per-layer")


def test_uncompiled_model_is_rejected():
    model = tiny_mlp()
    with pytest.raises((ValueError, RuntimeError), match="compile"):
        model.fit(X[:, :4], Y[:, :1], epochs=1, verbose=0, callbacks=[kerascool.GradientTransform(kerascool.Scale(1.0))])


def test_log_norms_are_epoch_means_of_the_incoming_gradient():
    raw = raw_grads()
    model = _model()
    history = model.fit(X, Y, batch_size=16, epochs=1, verbose=0,
                        callbacks=[kerascool.GradientTransform(kerascool.ClipByNorm(1e-6), log_norms="layer")])
    logs = history.history
    assert logs["grad_norm"][0] == pytest.approx(np.sqrt(sum(np.sum(g**2) for g in raw)), rel=1e-4)
    assert logs["grad_norm/mlp/out"][0] == pytest.approx(np.sqrt(np.sum(raw[2] ** 2) + np.sum(raw[3] ** 2)), rel=1e-4)
