"""Large result arrays reuse the memory of dropped results, never of live ones."""

import gc

import numpy as np
import pytest

from nbderiv import result_memory as rm


@pytest.fixture(autouse=True)
def empty_pool():
    rm.release()
    yield
    rm.release()


BIG = (50_000, 100)  # 20 MB of float32: pooled
SMALL = (1_000, 10)


def test_small_arrays_are_plain_numpy_arrays():
    a = rm.result_array(SMALL, np.float64)
    assert a.flags.owndata and a.shape == SMALL and a.dtype == np.float64


def test_a_dropped_buffer_serves_the_next_array_of_that_size():
    a = rm.result_array(BIG, np.float32)
    assert a.flags.writeable and a.flags.c_contiguous and rm.owned(a)
    address = a.ctypes.data
    del a
    b = rm.result_array(BIG, np.float32)
    assert b.ctypes.data == address


def test_a_buffer_is_not_reused_while_any_view_of_it_lives():
    a = rm.result_array(BIG, np.float32)
    a[:] = 7.0
    view = a.reshape(BIG + (1,))[10:20]
    del a
    b = rm.result_array(BIG, np.float32)
    b[:] = -1.0
    assert not np.shares_memory(view, b)
    assert np.all(view == 7.0)
    del view
    c = rm.result_array(BIG, np.float32)  # now the first buffer is free again
    assert not np.shares_memory(c, b)


def test_only_a_buffer_of_one_to_two_times_the_size_is_taken():
    a = rm.result_array((200_000, 100), np.float32)  # 80 MB
    del a
    small = rm.result_array((50_000, 100), np.float32)  # 20 MB: the 80 MB buffer is too big
    big = rm.result_array((150_000, 100), np.float32)  # 60 MB: fits in the 80 MB buffer
    assert not np.shares_memory(small, big)
    assert len(rm._idle) == 0


def test_kept_memory_is_capped_and_released(monkeypatch):
    monkeypatch.setattr(rm, "KEEP_BYTES", 50 * 2**20)
    arrays = [rm.result_array(BIG, np.float32) for _ in range(4)]  # 4 x 20 MB
    del arrays
    gc.collect()
    assert sum(r.nbytes for r in rm._idle) <= 50 * 2**20
    assert rm.release() > 0 and not rm._idle


def test_owned_tells_views_from_owners():
    a = rm.result_array(BIG, np.float32)
    assert rm.owned(a) and rm.owned(np.zeros(3))
    assert not rm.owned(a[1:]) and not rm.owned(np.zeros(4)[1:])


def test_two_live_torch_results_never_share_memory():
    torch = pytest.importorskip("torch")
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 600))
    x = np.linspace(-1, 1, 12_000, dtype=np.float32).reshape(-1, 1)
    first = nbderiv.derivatives(net, x, order=1)
    kept_y, kept_d = first.y.copy(), first[1].copy()
    dropped = nbderiv.derivatives(net, x + 1, order=1)
    del dropped  # its buffers go back to the pool ...
    second = nbderiv.derivatives(net, x - 1, order=1)  # ... and serve this call
    for a in (first.y, first[1]):
        for b in (second.y, second[1]):
            assert not np.shares_memory(a, b)
    np.testing.assert_array_equal(first.y, kept_y)
    np.testing.assert_array_equal(first[1], kept_d)
    with torch.no_grad():
        expected = net(torch.as_tensor(x - 1)).numpy()
    np.testing.assert_allclose(second.y, expected, rtol=1e-6, atol=1e-6)


def test_two_live_tensorflow_results_never_share_memory():
    keras = pytest.importorskip("keras")
    import nbderiv

    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.Dense(600)])
    x = np.linspace(-1, 1, 12_000, dtype=np.float32).reshape(-1, 1)
    first = nbderiv.derivatives(net, x, order=1)
    kept_y, kept_d = first.y.copy(), first[1].copy()
    dropped = nbderiv.derivatives(net, x + 1, order=1)
    del dropped
    second = nbderiv.derivatives(net, x - 1, order=1)
    for a in (first.y, first[1]):
        for b in (second.y, second[1]):
            assert not np.shares_memory(a, b)
    np.testing.assert_array_equal(first.y, kept_y)
    np.testing.assert_array_equal(first[1], kept_d)
    np.testing.assert_allclose(second.y, net(x - 1, training=False).numpy(), rtol=1e-5,
                               atol=1e-5)
