"""Errors that sent users the wrong way (found by an exploratory tester): an attention mask of
shape (T, T) sliced as per-point data when N == T (``nbderiv.shared`` passes it as it is); a
lambda holding a tensor with one row per point while nbderiv calls it on subsets of the
points; a list ``[x, t]`` read as points rather than as separate arguments."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import jacrev, vmap  # noqa: E402

import nbderiv  # noqa: E402
from nbderiv.compute import open_call  # noqa: E402
from nbderiv.errors import InputShapeError, InputTypeError, ModelCallError, NbderivError  # noqa: E402
from nbderiv.inputs import Shared  # noqa: E402
from nbderiv.model_errors import model_error_fix  # noqa: E402
from nbderiv.model_errors_points import per_point_data_failed, sliced_kwargs  # noqa: E402
from nbderiv.wrapped import user_frames  # noqa: E402


# -- 1. kwargs= arrays that are the same for every point ------------------------------------
def _encoder(t, e=4):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(e, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval().double()
    mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
    x = torch.randn(t, t, e, dtype=torch.float64)  # N == T points, each a sequence (T, E)
    return enc, mask, x


@contextmanager
def _quiet():  # vmap over attention warns about a missing batching rule on some versions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _per_point_jacobian(enc, x, mask):
    with _quiet():
        return vmap(jacrev(lambda p: enc(p[None], mask=mask)[0]))(x).detach().numpy()


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_shared_passes_a_causal_mask_as_it_is_when_there_are_as_many_points_as_steps(chunk_size):
    enc, mask, x = _encoder(12)
    truth = _per_point_jacobian(enc, x, mask)
    assert np.abs(truth - _per_point_jacobian(enc, x, None)).max() > 1e-3  # the mask matters
    with _quiet():
        d = nbderiv.derivatives(enc, x, order=1, chunk_size=chunk_size,
                                kwargs={"mask": nbderiv.shared(mask)})
        wrapped = nbderiv.derivatives(lambda z, mask: enc(z, mask=mask), x, order=1,
                                      kwargs={"mask": nbderiv.shared(mask)})
    assert d[1].shape == truth.shape == (12, 12, 4, 12, 4)
    np.testing.assert_allclose(d[1], truth, atol=1e-10)
    np.testing.assert_allclose(wrapped[1], truth, atol=1e-10)


def test_a_sliced_attention_mask_is_named_with_the_way_to_pass_it_as_it_is():
    enc, mask, x = _encoder(20)  # more points than the probe takes: it runs on a subset
    with _quiet(), pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(enc, x, order=1, kwargs={"mask": mask})
    text = str(info.value)
    assert "kwargs['mask'] (shape (20, 20)) has a first axis of length 20, the number of " \
           "points, so nbderiv slices it with the points" in text
    assert "kwargs={'mask': nbderiv.shared(mask)}" in text
    assert "Traceback" not in text


def test_the_sliced_kwargs_are_named_only_for_the_call_that_slices_them():
    net = nn.Linear(3, 2).double()
    x = torch.zeros(20, 3, dtype=torch.float64)
    call = open_call(lambda z, w: net(z) * w, x, None, kwargs={"w": torch.ones(20, 2)})
    assert sliced_kwargs(call) == (("w", (20, 2)),)
    fix = model_error_fix(RuntimeError("size mismatch"), call.n, sliced=sliced_kwargs(call))
    assert "kwargs['w'] (shape (20, 2))" in fix and "nbderiv.shared(w)" in fix
    assert fix.endswith("and fix the error it raises there.")
    # a kwarg that is not sliced (another first axis, or shared) is not named
    other = open_call(lambda z, w: net(z) * w, x, None, kwargs={"w": torch.ones(5, 2)})
    marked = open_call(lambda z, w: net(z), x, None,
                       kwargs={"w": nbderiv.shared(torch.ones(20, 2))})
    assert sliced_kwargs(other) == sliced_kwargs(marked) == ()
    assert "nbderiv.shared" not in model_error_fix(RuntimeError("size mismatch"), 20)
    # a later call without kwargs that fails is not told about an earlier call's kwargs
    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(nn.Linear(4, 1).double(), x)
    assert "kwargs" not in str(info.value)


def test_a_sliced_mask_is_named_when_the_probe_takes_every_point():
    enc, mask, x = _encoder(8)  # the probe runs all 8 points, then the first 7 alone
    with _quiet(), pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(enc, x, order=1, kwargs={"mask": mask})
    assert "kwargs={'mask': nbderiv.shared(mask)}" in str(info.value)


class _MaskedAttention(nn.Module):
    """Hand-written self-attention with a boolean (T, T) mask, which broadcasts over the
    batch (a (1, T) row of it too)."""

    def __init__(self, e=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e),
                                          nn.Linear(e, 2))

    def forward(self, x, mask=None):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 2.0
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return self.o((scores.softmax(-1) @ self.v(x)).mean(1))


def test_a_sliced_mask_that_broadcasts_is_refused_not_read_as_coupled_points():
    # N == T == 2: the probe's one-point batch gets one row of the (T, T) mask, which the
    # model broadcasts, so the points looked coupled (a false coupled-samples finding)
    torch.manual_seed(1)
    att = _MaskedAttention().double().eval()
    causal = torch.triu(torch.ones(2, 2, dtype=torch.bool), 1)
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    with pytest.raises(nbderiv.errors.OptionError) as info:
        nbderiv.derivatives(att, x, order=1, kwargs={"mask": causal})
    text = str(info.value)
    assert "kwargs['mask'] (shape (2, 2))" in text and "nbderiv.shared(mask)" in text
    d = nbderiv.derivatives(att, x, order=1, kwargs={"mask": nbderiv.shared(causal)})
    assert d.codes == []
    truth = vmap(jacrev(lambda p: att(p[None], mask=causal)[0]))(x).detach().numpy()
    np.testing.assert_allclose(d[1], truth, atol=1e-12)


def test_per_point_data_that_happens_to_be_square_is_still_sliced():
    # a real per-point (N, T) padding mask with N == T == 2 on a per-point model: no refusal
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()

    def masked_mean(z, keep):  # (N, T, 3), (N, T) -> (N, 1)
        return (net(z)[..., 0] * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    keep = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    d = nbderiv.derivatives(masked_mean, x, kwargs={"keep": keep})
    truth = vmap(jacrev(lambda p, k: masked_mean(p[None], k[None])[0]))(x, keep)
    np.testing.assert_allclose(d[1], truth.detach().numpy(), atol=1e-12)
    assert d.codes == []


def test_per_point_data_failed_says_when_a_failure_on_fewer_points_has_that_cause():
    net = nn.Linear(3, 2).double()
    x = torch.zeros(20, 3, dtype=torch.float64)
    call = open_call(lambda z, w: net(z) * w, x, None, kwargs={"w": torch.ones(20, 2)})
    assert per_point_data_failed(RuntimeError("size mismatch"), 20, sliced_kwargs(call))
    assert not per_point_data_failed(RuntimeError("size mismatch"), 20)
    mask = torch.ones(20, 2)
    try:
        (lambda z: net(z) * mask)(x[:7])
    except RuntimeError as exc:
        held = exc
    assert per_point_data_failed(held, 20) and not per_point_data_failed(held, 7)


def test_shared_is_a_small_public_marker():
    mask = torch.zeros(3, 3)
    marked = nbderiv.shared(mask)
    assert isinstance(marked, Shared) and marked.value is mask
    assert nbderiv.shared(marked) is marked
    assert "shared" in nbderiv.__all__
    assert repr(marked) == "nbderiv.shared(Tensor of shape (3, 3))"
    with pytest.raises(InputTypeError, match="marks a keyword argument in kwargs="):
        nbderiv.derivatives(nn.Linear(3, 1), marked)


def test_shared_with_a_tensorflow_model():
    tf = pytest.importorskip("tensorflow")
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10  # (N, N): looks per point, is not
    x = tf.constant(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    d = nbderiv.derivatives(lambda z, w: tf.matmul(z, w), x, order=1,
                            kwargs={"w": nbderiv.shared(tf.constant(w))})
    np.testing.assert_allclose(d[1], np.broadcast_to(w.T, (4, 4, 4)), rtol=1e-6)


# -- 2. a function holding per-point data of its own ----------------------------------------
class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()

    def forward(self, z, mask):
        return self.net(z) * mask


LABELS = None  # a global that a lambda names (set by the test)


def test_a_lambda_closing_over_a_per_point_mask_is_told_to_pass_it_as_a_kwarg():
    model, n = _Masked(), 20
    x = torch.randn(n, 3, dtype=torch.float64)
    mask = torch.rand(n, 4, dtype=torch.float64)
    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(lambda z: model(z, mask), x, order=1)
    text = str(info.value)
    assert "The lambda uses mask (Tensor of shape (20, 4)), whose first axis has the length " \
           "of x (20 points), but nbderiv calls the model on subsets of the points" in text
    assert "Fix: take mask as a keyword argument (lambda z, mask: ...) and pass " \
           "kwargs={'mask': mask}: nbderiv slices it with the points." in text
    assert "pass x of shape" not in text and "target=" not in text
    # the fix works, and gives the per-point derivatives
    d = nbderiv.derivatives(lambda z, mask: model(z, mask), x, order=1, kwargs={"mask": mask})
    truth = vmap(jacrev(lambda p, m: model(p[None], m[None])[0]))(x, mask).detach().numpy()
    np.testing.assert_allclose(d[1], truth, atol=1e-12)


def test_a_lambda_picking_outputs_with_global_labels_is_told_about_target():
    global LABELS
    net = _Masked().net
    x = torch.randn(20, 3, dtype=torch.float64)
    LABELS = torch.randint(0, 4, (20,))
    try:
        with pytest.raises(InputShapeError) as info:
            nbderiv.derivatives(lambda z: net(z)[torch.arange(20), LABELS], x, order=1)
        text = str(info.value)
        assert "The lambda uses LABELS (Tensor of shape (20,))" in text
        assert "kwargs={'LABELS': LABELS}" in text
        assert "return the whole output y and pass target=LABELS instead." in text
        d = nbderiv.derivatives(net, x, order=1, target=LABELS)
        full = vmap(jacrev(lambda p: net(p[None])[0]))(x).detach().numpy()
        np.testing.assert_allclose(d[1][:, 0], full[np.arange(20), LABELS.numpy()], atol=1e-12)
    finally:
        LABELS = None


def test_no_hint_about_held_arrays_that_do_not_explain_the_failure():
    net = _Masked().net  # takes 3 features
    mask = torch.rand(6, 4, dtype=torch.float64)
    # the function got every point (6 <= the probe's points): its mask lines up; x is wrong
    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(lambda z: net(z) * mask, torch.zeros(6, 5, dtype=torch.float64))
    assert "uses mask" not in str(info.value) and "pass x" in str(info.value)
    # an array with another number of rows than x's points is not per-point data
    labels = torch.zeros(20, dtype=torch.long)
    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(lambda z: net(z)[torch.arange(20), labels],
                            torch.zeros(6, 3, dtype=torch.float64))
    assert "uses labels" not in str(info.value)


def test_user_frames_are_the_users_own_functions_with_what_they_name():
    net = nn.Linear(2, 2)
    mask = torch.ones(5, 2)

    def model(z):
        return net(z) * mask

    try:
        model(torch.ones(3, 2))
    except RuntimeError as exc:
        running = user_frames(exc.__traceback__)
    # the test's own frame, then model(): torch's frames are left out
    assert [r.function.split(".")[-1] for r in running][-1] == "model()"
    (name, value), = running[-1].arguments
    assert name == "z" and tuple(value.shape) == (3, 2)
    assert [n for n, _ in running[-1].held] == ["mask", "net"]


# -- 3. a list of arrays is read as points --------------------------------------------------
def test_a_list_of_two_arguments_is_told_that_a_tuple_passes_them_separately():
    torch.manual_seed(0)
    pinn = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    xs = torch.rand(20, 1, dtype=torch.float64)
    ts = torch.rand(20, 1, dtype=torch.float64)

    def model(x, t):
        return pinn(torch.cat([x, t], dim=1))

    with pytest.raises(InputShapeError) as info:
        nbderiv.derivatives(model, [xs, ts])
    text = str(info.value)
    assert "x was a list of 2 arrays / tensors of shape (20, 1), which nbderiv reads as 2 " \
           "points of shape (20, 1), like np.array(x); a tuple is read as separate " \
           "arguments." in text
    assert "Fix: if they are separate arguments of the model (a Keras model with several " \
           "inputs too), pass them as a tuple, x=tuple(x) (e.g. (x, t) rather than [x, t])." \
           in text
    d = nbderiv.derivatives(model, (xs, ts), order=1)
    truth = vmap(jacrev(lambda p: pinn(p[None])[0]))(torch.cat([xs, ts], 1)).detach().numpy()
    np.testing.assert_allclose(d[1], truth, atol=1e-12)


def test_a_ragged_list_of_arguments_is_told_about_the_tuple_too():
    xs, ts = torch.rand(20, 1), torch.rand(20, 2)
    with pytest.raises(InputTypeError) as info:
        nbderiv.derivatives(nn.Linear(3, 1), [xs, ts])
    text = str(info.value)
    assert "x is a list of 2 arrays / tensors, which nbderiv reads as points" in text
    assert "x=tuple(x)" in text and "torch.stack(x)" in text


def test_lists_of_points_and_of_images_still_work_without_a_word():
    torch.manual_seed(0)
    net = nn.Linear(2, 1).double()
    points = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
    d = nbderiv.derivatives(net, points, order=1)
    assert d[1].shape == (2, 1, 2) and not d.findings
    np.testing.assert_allclose(d[1][:, 0], net.weight.detach().numpy().repeat(2, 0))
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1)).double()
    images = [torch.rand(1, 4, 4, dtype=torch.float64) for _ in range(3)]
    d = nbderiv.derivatives(cnn, images, order=1)
    truth = vmap(jacrev(lambda p: cnn(p[None])[0]))(torch.stack(images)).detach().numpy()
    assert d[1].shape == (3, 1, 1, 4, 4) and not d.findings
    np.testing.assert_allclose(d[1], truth, atol=1e-12)


def test_a_list_for_a_two_input_keras_model_is_told_about_the_tuple():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    a, b = keras.Input((1,)), keras.Input((1,))
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], keras.layers.Dense(1)(h))
    xs = np.linspace(0, 1, 20, dtype=np.float32)[:, None]
    ts = np.linspace(1, 2, 20, dtype=np.float32)[:, None]
    with pytest.raises(NbderivError) as info:  # Keras' own words: "expects 2 input(s)"
        nbderiv.derivatives(model, [xs, ts])
    assert isinstance(info.value, (ModelCallError, InputShapeError))
    assert "x was a list of 2 arrays / tensors of shape (20, 1)" in str(info.value)
    assert "x=tuple(x)" in str(info.value)
    assert nbderiv.derivatives(model, (xs, ts), order=1)[1].shape == (20, 1, 2)


def test_a_plain_function_given_a_list_of_tensors_is_run_by_torch_and_told_about_tuples():
    x, t = torch.rand(20, 1, dtype=torch.float64), torch.rand(20, 1, dtype=torch.float64)
    with pytest.raises(NbderivError) as info:
        nbderiv.derivatives(lambda x, t: torch.sin(x) * t, [x, t])
    assert "cannot tell which framework" not in str(info.value)
    assert "pass them as a tuple, x=tuple(x)" in str(info.value)
    d = nbderiv.derivatives(lambda x, t: torch.sin(x) * t, (x, t))
    assert np.allclose(d[1][:, 0, 0], (torch.cos(x) * t)[:, 0].numpy(), rtol=1e-12)


# -- 4. a keyword argument the model does not take ------------------------------------------
@pytest.mark.parametrize("mask", [torch.ones(5, 3), torch.ones(2, 3)],
                         ids=["sliced", "as-it-is"])
def test_a_keyword_the_model_does_not_take_is_named_and_shared_is_not_suggested(mask):
    with pytest.raises(NbderivError) as info:
        nbderiv.derivatives(nn.Linear(3, 1), torch.rand(5, 3), kwargs={"mask": mask})
    text = str(info.value)
    assert "unexpected keyword argument 'mask'" in text
    assert "The model takes no keyword argument 'mask'" in text
    assert "leave 'mask' out of kwargs=" in text
    assert "shared" not in text


def test_shared_is_suggested_for_a_sliced_array_only_when_the_failure_may_be_its_rows():
    sliced = (("w", (20, 2)),)
    assert "nbderiv.shared(w)" in model_error_fix(RuntimeError("boom"), 20, sliced=sliced)
    for exc in (NameError("name 'np' is not defined"),
                AttributeError("'Tensor' object has no attribute 'foo'")):
        assert "shared" not in model_error_fix(exc, 20, sliced=sliced)


def test_a_model_that_fails_once_a_point_moves_gets_told_why():
    """Token ids as floats into an embedding: the model takes x itself, but the probe's
    point moved by 0.1 (1 + |x|) leaves the vocabulary. The error says that, and that
    indices have no derivative (it said to fix x's shape, which was right)."""
    from nbderiv.errors import ModelCallError

    emb, head = torch.nn.Embedding(20, 4), torch.nn.Linear(12, 1)

    def model(ids):
        return head(emb(ids.long()).flatten(1))

    tokens = torch.tensor([[19.0, 3.0, 5.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert model(tokens).shape == (3, 1)
    with pytest.raises(ModelCallError) as info:
        nbderiv.derivatives(model, tokens)
    text = str(info.value)
    assert "moved a point" in text and "embeddings" in text and "shape (N" not in text


def test_train_mode_batchnorm_on_two_points_names_batchnorm_not_the_output():
    # nbderiv runs the model on one point of the two (the probe's fewer-points check): a
    # train-mode BatchNorm refuses one point; the output's rows are fine
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).train()
    x = torch.rand(2, 1)
    with pytest.raises(ModelCallError) as info:
        nbderiv.derivatives(net, x)
    text = str(info.value)
    assert "BatchNorm in training mode" in text and "model.eval()" in text
    assert "one row per point" not in text
    assert net.training and int(net[1].num_batches_tracked) == 0
    # the fix works: in eval mode the two points get their own derivatives
    d = nbderiv.derivatives(net.eval(), x)
    truth = vmap(jacrev(net))(x[:, None]).reshape(2, 1, 1).detach().numpy()
    np.testing.assert_allclose(d[1], truth, rtol=1e-5, atol=1e-7)


def test_a_keyword_a_plain_stack_does_not_take_is_refused_in_every_form():
    # a constant kwargs value went around the probe (a plain stack needs none) and Taylor
    # mode ignored it: the model, called as nbderiv would call it, refuses it
    seq = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.rand(4, 1)
    with pytest.raises(TypeError):
        seq(x, mask=1)
    for kwargs in ({"mask": 1}, {"mask": np.ones(4)}):
        with pytest.raises(nbderiv.errors.OptionError, match="unexpected keyword argument 'mask'"):
            nbderiv.derivatives(seq, x, kwargs=kwargs)


def test_a_model_class_or_meta_weights_are_named():
    x = torch.rand(3, 1)
    with pytest.raises(nbderiv.errors.ModelTypeError, match="is the class torch.nn"):
        nbderiv.derivatives(nn.Linear, x)
    meta = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to("meta")
    for model in (meta, lambda z: meta(z)):  # (it failed in the state restore, NotImplemented)
        with pytest.raises(nbderiv.errors.ModelTypeError, match="'meta' device"):
            nbderiv.derivatives(model, x)
    assert all(p.is_meta for p in meta.parameters())


def test_a_numpy_function_as_the_model_is_named():
    # "cannot tell which framework runs ufunc on a ndarray input" said nothing of the mistake
    for call in (lambda: nbderiv.derivatives(np.sin, np.linspace(0, 1, 5)),
                 lambda: nbderiv.explore(np.sin)):
        with pytest.raises((TypeError, ValueError), match="NumPy function np.sin") as info:
            call()
        assert "reference=" in str(info.value)
    with pytest.raises(nbderiv.errors.ModelTypeError, match="NumPy function"):  # torch x too
        nbderiv.derivatives(np.sin, torch.linspace(0, 1, 5))


def test_coupled_samples_names_the_cause_it_has():
    # model.eval() and "running statistics were put back" were said for models in eval mode
    # whose forward pass mixes the points itself
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2).eval()  # no batch_first: axis 0 is read as the sequence
    x = torch.randn(3, 5, 4)
    d = nbderiv.derivatives(lambda z: mha(z, z, z)[0].sum((1, 2))[:, None], x)
    f = d.finding("coupled-samples")
    assert "batch_first=True" in f.fix and "model.eval()" not in f.fix
    assert "running statistics" not in f.message
    full = torch.autograd.functional.jacobian(lambda z: mha(z, z, z)[0].sum((1, 2)), x)
    blocks = torch.stack([full[n, n] for n in range(3)]).numpy()
    np.testing.assert_allclose(d[1][:, 0], blocks, rtol=1e-4, atol=1e-6)
    f = nbderiv.derivatives(lambda z: z - z.mean(0), torch.randn(4, 1)).finding("coupled-samples")
    assert "no layer runs in training mode" in f.fix and "model.eval()" not in f.fix
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    f = nbderiv.derivatives(bn, torch.randn(5, 2)).finding("coupled-samples")
    assert "model.eval()" in f.fix and "running statistics were put back" in f.message


def test_numpy_constants_in_kwargs_reach_a_torch_model_as_tensors():
    """A NumPy constant in kwargs= (plain, or marked nbderiv.shared) used to reach forward as
    an ndarray and fail with 'the forward pass leaves the framework (.numpy() ...)'. Truth:
    float64 vmap(jacrev) with the constant as a tensor."""
    import torch

    torch.manual_seed(0)

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, scale=None):
            return torch.tanh(self.lin(x)) * scale

    m, x = Scaled(), torch.randn(4, 3)
    scale = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    m64 = __import__("copy").deepcopy(m).double()
    s64 = torch.as_tensor(scale, dtype=torch.float64)
    truth = torch.func.vmap(torch.func.jacrev(lambda p: m64(p, s64)))(x.double())
    for value in (scale, nbderiv.shared(scale)):
        d = nbderiv.derivatives(m, x, kwargs={"scale": value})
        np.testing.assert_allclose(d[1], truth.detach().numpy(), atol=1e-6)


def test_a_kwargs_array_of_the_wrong_length_is_named_not_x():
    # mask[:4] for 20 points: the model's error names 4 and the probe's batch size, not 20;
    # it was blamed on x ("pass x of shape (N, *S) ...")
    torch.manual_seed(0)
    net = nn.Linear(3, 2)

    def masked(z, mask):
        return net(z) * mask[:, None]
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(nbderiv.errors.OptionError) as info:
        nbderiv.derivatives(masked, x, kwargs={"mask": torch.ones(4)})
    text = str(info.value)
    assert "kwargs['mask'] has shape (4,), whose first axis is not the 20 points" in text
    assert "pass x of shape" not in text
    # one row per point works, and is the model's own derivative: net's weight, masked
    mask = (torch.arange(20) % 3 > 0).float()
    d = nbderiv.derivatives(masked, x, kwargs={"mask": mask})
    np.testing.assert_allclose(d[1], mask.numpy()[:, None, None] * net.weight.detach().numpy(),
                               atol=1e-7)


def test_a_list_of_separate_inputs_for_a_model_that_unpacks_them_points_to_the_tuple():
    # model([a, b]) unpacking a, b = inputs: nbderiv reads the list as 2 points; the error
    # said "do not reduce over the points inside the model", which it does not
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def two(inputs):
        a, b = inputs
        return net(torch.cat([a, b], -1))
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 2, generator=gen).double(), torch.randn(5, 2, generator=gen).double()
    with pytest.raises(nbderiv.errors.OutputError) as info:
        nbderiv.derivatives(two, [a, b])
    assert "pass them as a tuple, x=tuple(x)" in str(info.value)
    d = nbderiv.derivatives(lambda p, q: two([p, q]), (a, b))
    truth = vmap(jacrev(lambda z: net(z[None])[0]))(torch.cat([a, b], 1)).detach().numpy()
    np.testing.assert_allclose(d[1], truth, atol=1e-12)
