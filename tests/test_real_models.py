"""Real architectures (issue 17): CNNs with BatchNorm, LSTM / GRU regressors, a
TransformerEncoder at order 2 (scaled-dot-product attention), an embedding encoder with an
attention mask, Keras Conv2D / LSTM models. Every value is compared with an independent
reference: ``vmap(jacrev)``, ``torch.autograd.functional.hessian`` per point, Keras'
``batch_jacobian``, or float64 central differences."""

from __future__ import annotations

import numpy as np
import pytest

import nbderiv

torch = pytest.importorskip("torch")
from torch.func import jacrev, vmap  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def _layout(d, n, out_shape, point_shape):
    for k in range(1, d.order + 1):
        assert d[k].shape == (n,) + out_shape + point_shape * k
        assert len(d.axes(k)) == d[k].ndim


def _cnn(n_out=10):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
        torch.nn.Tanh(), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, n_out))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.double().eval()


def test_cnn_batchnorm_eval_order1_against_vmap_jacrev():
    net = _cnn(10)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    d = nbderiv.derivatives(net, x, order=1)
    _layout(d, 5, (10,), (3, 8, 8))
    ref = vmap(jacrev(lambda z: net(z[None])[0]))(x)
    np.testing.assert_allclose(d[1], ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert not net.training and net[1].num_batches_tracked.item() == 0


def test_saliency_target_per_point_against_vmap_jacrev():
    net = _cnn(10)
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)  # more points than the probe's batch
    labels = torch.arange(12) % 10
    d = nbderiv.derivatives(net, x, order=1, target=labels)
    _layout(d, 12, (1,), (3, 8, 8))
    full = vmap(jacrev(lambda z: net(z[None])[0]))(x)
    np.testing.assert_allclose(d[1][:, 0], full[torch.arange(12), labels].detach().numpy(),
                               rtol=1e-10, atol=1e-12)


class _Recurrent(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(torch.nn, kind)(3, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.rnn(x)[0][:, -1]))


def _per_point_hessians(fn, x):
    """torch.autograd.functional.hessian of each output at each point: (N, d_out, *S, *S)."""
    with sdpa_kernel([SDPBackend.MATH]):
        out = []
        for i in range(x.shape[0]):
            d_out = fn(x[i:i + 1]).reshape(-1).shape[0]
            out.append(torch.stack([torch.autograd.functional.hessian(
                lambda z, j=j: fn(z[None]).reshape(-1)[j], x[i]) for j in range(d_out)]))
        return torch.stack(out).detach().numpy()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_regressor_orders_1_and_2(kind):
    torch.manual_seed(1)
    net = _Recurrent(kind).double().eval()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    d = nbderiv.derivatives(net, x, order=2)
    _layout(d, 4, (2,), (5, 3))
    with torch.backends.cudnn.flags(enabled=False):
        ref1 = torch.stack([torch.autograd.functional.jacobian(
            lambda z: net(z[None])[0], x[i]) for i in range(4)])
    np.testing.assert_allclose(d[1], ref1.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d[2], _per_point_hessians(net, x), rtol=1e-8, atol=1e-11)


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        h = self.enc(x, src_key_padding_mask=pad)
        if attention_mask is None:
            return self.head(h.mean(1))
        w = attention_mask.to(h.dtype)[..., None]
        return self.head((h * w).sum(1) / w.sum(1))


def test_transformer_encoder_order2_matches_hessian_and_restores_kernels():
    torch.manual_seed(2)
    net = _Encoder().double().eval()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    before = torch.nn.attention._cur_sdpa_kernel_backends()
    d = nbderiv.derivatives(net, x, order=2)
    assert torch.nn.attention._cur_sdpa_kernel_backends() == before
    _layout(d, 3, (1,), (4, 8))
    np.testing.assert_allclose(d[2], _per_point_hessians(net, x), rtol=1e-8, atol=1e-11)


def test_user_kernel_choice_is_put_back():
    torch.manual_seed(2)
    net = _Encoder().eval()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        chosen = torch.nn.attention._cur_sdpa_kernel_backends()
        nbderiv.derivatives(net, torch.randn(2, 3, 8), order=2)
        assert torch.nn.attention._cur_sdpa_kernel_backends() == chosen


def test_embedding_encoder_wrt_embeddings_with_attention_mask():
    """inputs_embeds style: the embeddings are differentiated, the mask travels in kwargs."""
    torch.manual_seed(3)
    emb = torch.nn.Embedding(20, 8).double()
    net = _Encoder().double().eval()
    tokens = torch.randint(0, 20, (5, 4))
    x = emb(tokens).detach()
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 2:] = 0
    d = nbderiv.derivatives(net, x, order=1, kwargs={"attention_mask": mask})
    _layout(d, 5, (1,), (4, 8))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.stack([torch.autograd.functional.jacobian(
            lambda z, i=i: net(z[None], attention_mask=mask[i:i + 1])[0], x[i])
            for i in range(5)])
    np.testing.assert_allclose(d[1], ref.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert np.all(d[1][1, 0, 3:] == 0) and np.all(d[1][3, 0, 2:] == 0)  # masked tokens


def test_lstm_many_outputs_batched_equals_looped():
    """A sequence output (one value per time step): the batched backward passes give the
    same numbers as one backward pass per output (float64 central differences as truth)."""
    torch.manual_seed(4)
    rnn, head = torch.nn.LSTM(2, 4, batch_first=True).double(), torch.nn.Linear(4, 1).double()

    def seq(x):
        return head(rnn(x)[0])[..., 0]  # (N, 10): 10 cotangents, batched

    x = torch.randn(3, 10, 2, dtype=torch.float64)
    d = nbderiv.derivatives(seq, x, order=1)
    _layout(d, 3, (10,), (10, 2))
    eps, fd = 1e-6, np.zeros((3, 10, 10, 2))
    with torch.no_grad():
        for t in range(10):
            for f in range(2):
                e = torch.zeros_like(x)
                e[:, t, f] = eps
                fd[:, :, t, f] = ((seq(x + e) - seq(x - e)) / (2 * eps)).numpy()
    np.testing.assert_allclose(d[1], fd, rtol=1e-6, atol=1e-8)


# -- Keras ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_tf():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    return keras, tf


def test_keras_conv2d_against_batch_jacobian(keras_tf):
    keras, tf = keras_tf
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, padding="same", activation="tanh"),
        keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(9)])
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 2)).astype("float32")
    d = nbderiv.derivatives(model, x, order=1)
    _layout(d, 4, (9,), (6, 6, 2))
    X = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = model(X, training=False)
    ref = tape.batch_jacobian(y, X).numpy()
    np.testing.assert_allclose(d[1], ref, rtol=1e-4, atol=1e-6)


def test_keras_lstm_order2_against_batch_jacobian(keras_tf):
    keras, tf = keras_tf
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3, 2)), keras.layers.LSTM(4),
                              keras.layers.Dense(1)])
    x = np.random.default_rng(1).standard_normal((3, 3, 2)).astype("float32")
    d = nbderiv.derivatives(model, x, order=2)
    _layout(d, 3, (1,), (3, 2))
    X = tf.constant(x)
    with tf.GradientTape() as outer:
        outer.watch(X)
        with tf.GradientTape() as inner:
            inner.watch(X)
            y = model(X, training=False)
        g = tf.reshape(inner.batch_jacobian(y, X), (3, -1))
    H = outer.batch_jacobian(g, X).numpy().reshape(3, 1, 3, 2, 3, 2)
    np.testing.assert_allclose(d[2], H, rtol=1e-3, atol=1e-5)
