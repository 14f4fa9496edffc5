"""Result memory: by default plain NumPy arrays whose memory goes back when they are dropped;
with the opt-in pool (``keep``), large arrays reuse the memory of dropped results, never of
live ones."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nbderiv import result_memory as rm
from nbderiv.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]
BIG = (50_000, 100)  # 20 MB of float32: pooled when the pool is on
SMALL = (1_000, 10)


@pytest.fixture
def no_pool():
    previous = rm.keep(0)
    yield
    rm.keep(previous)


@pytest.fixture
def pool():
    """The pool explicitly on (1 GiB) for one test; the default is restored after it."""
    previous = rm.keep(2**30)
    rm.release()
    yield
    rm.release()
    rm.keep(previous)


def _run(code: str, **env) -> dict:
    """``code`` in a fresh interpreter (no NBDERIV_KEEP_RESULTS unless given); its last line
    of output, as JSON."""
    environ = {k: v for k, v in os.environ.items() if k != rm.ENV_VAR}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# The resident memory of a fresh process before, while and after it holds a 256 MB result.
_RSS = """
import gc, json, os
import numpy as np
from nbderiv import result_memory as rm

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
a = rm.result_array((64 * 2**20,), np.float32)      # 256 MB
a[:] = 1.0                                          # touched: resident
plain = a.base is None and bool(a.flags.owndata)
held = rss()
del a
gc.collect()
print(json.dumps({"limit": rm.KEEP_BYTES, "plain": plain, "idle": len(rm._idle),
                  "before": before, "held": held, "after": rss()}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_by_default_a_dropped_large_result_gives_its_memory_back():
    got = _run(_RSS)
    assert got["limit"] == 0, "no pool unless asked for"
    assert got["plain"], "result_array is a plain np.empty by default"
    assert got["idle"] == 0
    assert got["held"] - got["before"] > 200 * 2**20
    assert got["after"] - got["before"] < 50 * 2**20, got


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_the_environment_variable_opts_in_and_then_the_memory_is_kept():
    got = _run(_RSS, **{rm.ENV_VAR: "1GiB"})
    assert got["limit"] == 2**30 and not got["plain"] and got["idle"] == 1
    assert got["after"] - got["before"] > 200 * 2**20, got


def test_a_bad_environment_variable_is_a_clear_error():
    out = subprocess.run([sys.executable, "-c", "import nbderiv.result_memory"], cwd=ROOT,
                         env=dict(os.environ, **{rm.ENV_VAR: "lots"}), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "OptionError" in out.stderr and rm.ENV_VAR in out.stderr and "Fix:" in out.stderr


def test_by_default_large_results_are_plain_numpy_and_nothing_is_kept(no_pool):
    a = rm.result_array(BIG, np.float32)
    assert a.base is None and a.flags.owndata and rm.owned(a)
    assert a.flags.writeable and a.flags.c_contiguous and a.shape == BIG
    del a
    gc.collect()
    assert rm._idle == []


def test_by_default_a_torch_result_uses_no_pool(no_pool):
    torch = pytest.importorskip("torch")
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 600))
    x = np.linspace(-1, 1, 12_000, dtype=np.float32).reshape(-1, 1)  # 29 MB per order
    d = nbderiv.derivatives(net, x, order=1)
    assert not any(isinstance(a.base, rm._Lease) for a in (d.y, d[1]))
    del d
    gc.collect()
    assert rm._idle == []


def test_keep_returns_the_previous_limit_and_keep_zero_frees(no_pool):
    assert rm.keep("64MiB") == 0
    a = rm.result_array(BIG, np.float32)
    assert isinstance(a.base, rm._Lease)
    del a
    assert len(rm._idle) == 1
    assert rm.keep(0) == 64 * 2**20
    assert rm._idle == []
    b = rm.result_array(BIG, np.float32)
    assert b.base is None
    del b
    assert rm._idle == []


def test_keep_rejects_what_is_no_byte_count(no_pool):
    with pytest.raises(OptionError, match="Fix:"):
        rm.keep("a lot")
    with pytest.raises(OptionError):
        rm.keep(-5)
    assert rm.KEEP_BYTES == 0


def test_a_result_larger_than_the_limit_is_plain_numpy(no_pool):
    rm.keep(10 * 2**20)
    a = rm.result_array(BIG, np.float32)  # 20 MB > 10 MB
    assert a.base is None
    del a
    assert rm._idle == []


def test_the_benchmark_timing_workers_opt_in():
    """The benchmark times repeated large results: the case where the pool pays."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for framework in ("torch", "tensorflow"):
        env = run._worker_env(framework, SimpleNamespace(tf_allocator="bfc"))
        assert rm._limit(env.get(rm.ENV_VAR), rm.ENV_VAR) >= 2**30


# -- with the pool explicitly on --------------------------------------------------------------
def test_small_arrays_are_plain_numpy_arrays(pool):
    a = rm.result_array(SMALL, np.float64)
    assert a.flags.owndata and a.shape == SMALL and a.dtype == np.float64


def test_a_dropped_buffer_serves_the_next_array_of_that_size(pool):
    a = rm.result_array(BIG, np.float32)
    assert a.flags.writeable and a.flags.c_contiguous and rm.owned(a)
    address = a.ctypes.data
    del a
    b = rm.result_array(BIG, np.float32)
    assert b.ctypes.data == address


def test_a_buffer_is_not_reused_while_any_view_of_it_lives(pool):
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


def test_only_a_buffer_of_one_to_two_times_the_size_is_taken(pool):
    a = rm.result_array((200_000, 100), np.float32)  # 80 MB
    del a
    small = rm.result_array((50_000, 100), np.float32)  # 20 MB: the 80 MB buffer is too big
    big = rm.result_array((150_000, 100), np.float32)  # 60 MB: fits in the 80 MB buffer
    assert not np.shares_memory(small, big)
    assert len(rm._idle) == 0


def test_kept_memory_is_capped_and_released(pool):
    rm.keep(50 * 2**20)
    arrays = [rm.result_array(BIG, np.float32) for _ in range(4)]  # 4 x 20 MB
    del arrays
    gc.collect()
    assert 0 < sum(r.nbytes for r in rm._idle) <= 50 * 2**20
    assert rm.release() > 0 and not rm._idle
    assert rm.KEEP_BYTES == 50 * 2**20, "release() empties the pool, it does not turn it off"


def test_owned_tells_views_from_owners(pool):
    a = rm.result_array(BIG, np.float32)
    assert isinstance(a.base, rm._Lease)
    assert rm.owned(a) and rm.owned(np.zeros(3))
    assert not rm.owned(a[1:]) and not rm.owned(np.zeros(4)[1:])


def test_two_live_torch_results_never_share_memory(pool):
    torch = pytest.importorskip("torch")
    import nbderiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 600))
    x = np.linspace(-1, 1, 12_000, dtype=np.float32).reshape(-1, 1)
    first = nbderiv.derivatives(net, x, order=1)
    kept_y, kept_d = first.y.copy(), first[1].copy()
    dropped = nbderiv.derivatives(net, x + 1, order=1)
    del dropped  # its buffers go back to the pool ...
    assert rm._idle, "the pool is on: a dropped result's buffers are kept"
    second = nbderiv.derivatives(net, x - 1, order=1)  # ... and serve this call
    for a in (first.y, first[1]):
        for b in (second.y, second[1]):
            assert not np.shares_memory(a, b)
    np.testing.assert_array_equal(first.y, kept_y)
    np.testing.assert_array_equal(first[1], kept_d)
    with torch.no_grad():
        expected = net(torch.as_tensor(x - 1)).numpy()
    np.testing.assert_allclose(second.y, expected, rtol=1e-6, atol=1e-6)


def test_two_live_tensorflow_results_never_share_memory(pool):
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
