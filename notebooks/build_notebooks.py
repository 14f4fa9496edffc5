"""Write the tutorial notebooks from the cell sources below, then execute them in place.

The notebooks in this folder are generated: edit the cells here (not in JupyterLab), then

    .venv/bin/python notebooks/build_notebooks.py            # write and execute all five
    .venv/bin/python notebooks/build_notebooks.py 03 04      # only names starting so
    .venv/bin/python notebooks/build_notebooks.py --no-execute

Executing stores the outputs that ``pytest --nbval`` compares later (``make test``).
``tests/test_notebooks.py`` checks that the committed notebooks hold exactly the cells this
script writes, with outputs. ``make notebooks`` re-executes them without regenerating.

Each notebook is a list of cells: ``md(text)`` for prose, ``code(text, *tags)`` for code
(tags are nbval's, e.g. ``"nbval-ignore-output"``, used only where the output genuinely
differs between a saved run and an nbval run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from textwrap import dedent

HERE = Path(__file__).resolve().parent
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
IGNORE_OUTPUT = "nbval-ignore-output"


def md(text: str):
    return ("markdown", dedent(text).strip("\n"), ())


def code(text: str, *tags: str):
    return ("code", dedent(text).strip("\n"), tags)


# The first cell of every notebook: TensorFlow reads these when it is first imported.
ENV = code("""
    # Set before anything imports TensorFlow (it reads them once, at import).
    import os

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"   # hide TensorFlow's C++ start-up lines
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # no oneDNN reordering: the same numbers every run
""")


# ==============================================================================================
# 00: the tour
# ==============================================================================================
def tour():
    return [
        md("""
        # nbderiv in five minutes

        `nbderiv` computes derivatives of a neural network **with respect to its inputs**, one
        point at a time: gradients, per-point Jacobians, Hessians and higher orders, for PyTorch
        and Keras models. In a notebook it shows what it computed (every axis named), checks it
        against finite differences on request, prints the plain framework code that does the
        same, and explains the classic surprises ("my second derivative is zero").

        The other notebooks take one confusing case each, from start to finish:
        [01](01_relu_second_derivative.ipynb) ReLU and second derivatives,
        [02](02_grad_outputs_ones.ipynb) `grad_outputs=ones`,
        [03](03_second_derivative_scalar.ipynb) a second derivative checked by hand,
        [04](04_jacobian_shapes_pinn.ipynb) Jacobian shapes in a PINN.
        """),
        ENV,
        md("""
        ## Load the extension

        `%load_ext nbderiv` registers the `%nnderiv` magic. It imports no framework: the model
        you pass decides between PyTorch and Keras.
        """),
        code("""
        import numpy as np
        import torch

        import nbderiv

        %load_ext nbderiv
        """),
        md("""
        ## A PyTorch model

        A small tanh network with one input, and 200 points on [-2, 2]. `%nnderiv MODEL X`
        computes orders 1 and 2 by default and displays a summary: the shape of each array,
        what each axis means, the range of the values, and findings (none here).
        """),
        code("""
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(1, 16), torch.nn.Tanh(),
            torch.nn.Linear(16, 16), torch.nn.Tanh(),
            torch.nn.Linear(16, 1),
        )
        x = torch.linspace(-2, 2, 200).reshape(-1, 1)

        %nnderiv net x
        """),
        md("""
        The magic also returns the result. `d[k]` is a numpy array of shape
        `(N, d_out) + (d_in,) * k`, and `d.axes(k)` names the axes, so a dimension of size 1
        never has to be guessed.
        """),
        code("""
        d = %nnderiv net x --order 3 --quiet
        for k in range(4):
            print(k, d[k].shape, d.axes(k))
        """),
        md("""
        ## `--plot`, `--check`, `--code`

        `--plot` draws y and each derivative against x. `--check` compares every order with
        central finite differences computed in float64, an independent route to the same
        numbers. `--code` prints the plain PyTorch code that computes the same arrays, to copy
        into a project that should not depend on nbderiv.
        """),
        code("""
        %nnderiv net x --plot
        """),
        code("""
        d = %nnderiv net x --check
        print("finite differences agree:", d.check.passed)
        """),
        code("""
        %nnderiv net x[:5] --order 2 --code
        """),
        md("""
        ## A ReLU network: the classic surprise

        Swap tanh for ReLU and the second derivative is exactly zero at every point. This is
        not an autodiff bug: a ReLU network is piecewise linear in its input. nbderiv says so,
        with the fix (notebook [01](01_relu_second_derivative.ipynb) tells the whole story).
        """),
        code("""
        torch.manual_seed(0)
        relu_net = torch.nn.Sequential(
            torch.nn.Linear(1, 16), torch.nn.ReLU(),
            torch.nn.Linear(16, 16), torch.nn.ReLU(),
            torch.nn.Linear(16, 1),
        )
        d_relu = %nnderiv relu_net x
        """),
        code("""
        print(d_relu.codes)
        print("second derivative all zero:", bool((d_relu[2] == 0).all()))
        """),
        md("""
        ## A Keras model

        The same magic works on a Keras 3 model (TensorFlow backend); the model's class tells
        nbderiv which framework to use. Here a model with two inputs and a grid of points:
        `d[2]` holds the full 2 x 2 Hessian at each point.
        """),
        code("""
        import keras

        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(2,))
        hidden = keras.layers.Dense(16, activation="tanh")(inputs)
        kmodel = keras.Model(inputs, keras.layers.Dense(1)(hidden))

        g = np.linspace(0, 2, 5, dtype="float32")
        xy = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)   # 25 points on [0, 2]^2, 2 inputs

        dk = %nnderiv kmodel xy --check
        """),
        code("""
        H = dk[2][0, 0]          # point 0, output 0: the 2 x 2 Hessian
        print(dk[2].shape, dk.axes(2))
        print("Hessian symmetric:", bool(np.allclose(H, H.T, atol=1e-6)))
        print("finite differences agree:", dk.check.passed)
        """),
        md("""
        ## The explorer widget

        `nbderiv.explore(model, domain)` draws y and its derivatives along one input and
        recomputes when a control moves: the derivative order, the domain, a finite-difference
        overlay. `reference` adds the true function's derivatives, dashed, when there is one.
        Try `nbderiv.explore(relu_net, domain=(-2, 2))` as well: from the second derivative
        on, everything is flat zero.
        """),
        code("""
        nbderiv.explore(net, domain=(-2, 2), n=200)
        """),
    ]


# ==============================================================================================
# 01: Case A, ReLU and the second derivative of x**2
# ==============================================================================================
def case_a():
    return [
        md("""
        # Case A: "my second derivative is all zeros"

        A frequently asked question: fit a network to $y = x^2$, ask TensorFlow for the second
        derivative, and get a matrix of zeros, although the answer should be 2 everywhere.
        The network is a Keras MLP `1 -> 128 -> 64 -> 32 -> 1` with ReLU, trained on the 14
        points x = 1, ..., 14.

        Plan: reproduce it with plain Keras and TensorFlow, see why it happens, let nbderiv
        find it, then fix it (a smooth activation) and check the fix against the closed form
        $d^2(x^2)/dx^2 = 2$ and against finite differences. The same story in PyTorch closes
        the notebook.
        """),
        ENV,
        md("""
        ## 1. Reproduce it in Keras

        Run as posted on Keras 3, the code stops twice before any derivative:
        `Adam(lr=...)` is rejected (the argument is `learning_rate=`) and
        `tensorflow.keras.losses.mean_squared_error` no longer exists (`loss="mse"` does the
        same). With those two words changed, everything else is the original model.

        Training: `fit(x, y, epochs=1000)` takes 1000 full-batch steps (14 points, one batch).
        The same 1000 steps in one `fit` call over a repeated `tf.data` dataset give the same
        weights about 20 times faster, which keeps this notebook quick.
        """),
        code("""
        import numpy as np
        import tensorflow as tf
        import keras

        x_train = np.arange(1, 15, dtype="float32").reshape(-1, 1)   # x = 1 .. 14
        y_train = x_train**2


        def make_model(activation, seed=0):
            keras.utils.set_random_seed(seed)
            inputs = keras.Input(shape=(1,))
            h = keras.layers.Dense(128, activation=activation)(inputs)
            h = keras.layers.Dense(64, activation=activation)(h)
            h = keras.layers.Dense(32, activation=activation)(h)
            model = keras.Model(inputs, keras.layers.Dense(1)(h))
            model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
            return model


        def train(model, steps=1000):
            batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(14).repeat()
            model.fit(batches, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
            return model


        relu_model = train(make_model("relu"))
        fit_error = np.abs(relu_model.predict(x_train, verbose=0) - y_train).max()
        print("largest training error:", round(float(fit_error), 1))
        """),
        md("""
        The fit is good. Now the derivatives, as the question computes them: two nested
        `GradientTape`s, the inner one for the first derivative, the outer one for
        `tape.jacobian` of that first derivative.
        """),
        code("""
        x = np.array([1, 2, 3, 4, 5, 6])
        x = tf.convert_to_tensor(x, np.float32)

        with tf.GradientTape() as tape:
            tape.watch(x)
            with tf.GradientTape() as tape2:
                tape2.watch(x)
                y = relu_model(x)
            grad_y = tape2.gradient(y, x)
        grad_y2 = tape.jacobian(grad_y, x)

        print("y          ", y.shape, np.round(y.numpy().ravel(), 1))
        print("dy/dx      ", grad_y.shape, np.round(grad_y.numpy(), 1))
        print("d2y/dx2    ", grad_y2.shape)
        print(grad_y2.numpy())
        """),
        md("""
        The values are close to $x^2$, the first derivatives are only rough approximations of
        $2x$ (at x = 1 it is exactly 0), and the second derivative is a 6 x 6 matrix of zeros.

        ## 2. Why

        **ReLU makes the network piecewise linear.** Every layer is an affine map followed by
        $\\max(0, \\cdot)$, so on each small interval the whole network is a straight line.
        Its slope jumps at the kinks, and between kinks the second derivative is exactly 0.
        Autodiff differentiates the pieces, so it reports 0 almost everywhere: that is the
        right answer for this function, which only *looks* like $x^2$ at the training points.

        Two side details of the code:
        - `x` has shape (6,) but the model expects (N, 1). A functional Keras model quietly
          reads it as 6 points of one feature, which is why `y` is (6, 1) while `grad_y` is
          (6,). (A subclassed model, or a `Sequential` without an `Input`, would raise.)
        - `tape.jacobian(grad_y, x)` is the derivative of every first derivative with respect
          to every point: an N x N matrix. Point n depends only on x[n], so only its diagonal
          holds per-point second derivatives (here the diagonal is zero too).
          `tape.batch_jacobian` on (N, 1) inputs gives the per-point values directly.
        - The conversion to float32 matters: asked to watch an integer tensor, TensorFlow
          only logs a warning, and the gradient comes back as `None`.

        The slope is flat between kinks and jumps at them; the first derivative on a fine
        grid makes that visible.
        """),
        code("""
        %matplotlib inline
        from matplotlib.figure import Figure

        grid = tf.constant(np.linspace(1, 14, 400, dtype="float32").reshape(-1, 1))
        with tf.GradientTape() as t:
            t.watch(grid)
            out = relu_model(grid)
        slope = t.gradient(out, grid)

        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.plot(grid[:, 0], out[:, 0], label="ReLU network")
        top.plot(grid[:, 0], grid[:, 0] ** 2, "k--", lw=1, label="$x^2$")
        top.set_ylabel("$y$")
        top.legend()
        bottom.plot(grid[:, 0], slope[:, 0], label="network")
        bottom.plot(grid[:, 0], 2 * grid[:, 0], "k--", lw=1, label="$2x$")
        bottom.set_ylabel("$dy/dx$")
        bottom.set_xlabel("$x$")
        bottom.legend()
        fig
        """),
        md("""
        ## 3. What nbderiv shows

        `%nnderiv` computes the per-point derivatives (no N x N matrix) and inspects the
        model: its activations are all piecewise linear, so it raises the `piecewise-linear`
        finding with the fix. It reads the (6,)-shaped input the same way Keras did and says
        so (`input-reshaped`). And it explains the 0 at x = 1 (`at-kink`): there a ReLU's
        input is exactly 0, a kink, where the framework's derivative is a convention
        (relu'(0) = 0), not a derivative.
        """),
        code("""
        %load_ext nbderiv
        import nbderiv

        d = %nnderiv relu_model x
        """),
        code("""
        print(d.codes)
        print(d.finding("piecewise-linear").fix)
        """),
        md("""
        ## 4. The fix: a smooth activation

        With a smooth activation (tanh, softplus, SiLU, GELU) the second derivative is a
        real function of x. The same model with softplus, trained the same way. One caveat:
        the network's second derivative is only as good as its fit; it is close to 2 on
        average over the interior of the data and varies from point to point (and from seed to
        seed), so we check the mean over [2, 13], not each point.
        """),
        code("""
        soft_model = train(make_model("softplus"))

        xs = np.linspace(2, 13, 45, dtype="float32").reshape(-1, 1)
        d_soft = nbderiv.derivatives(soft_model, xs, order=2, check=True)
        mean_d2 = float(d_soft[2].mean())

        print("findings:", d_soft.codes)
        print("mean second derivative on [2, 13]:", round(mean_d2, 1))
        print("second derivative ≈ 2 within tolerance:", abs(mean_d2 - 2) < 0.1)
        print("finite differences agree:", d_soft.check.passed)
        """),
        md("""
        The same second derivative without nbderiv: per-point values with
        `tape.batch_jacobian` (the N x N `jacobian` of before, minus its zero off-diagonal
        part). It agrees with nbderiv's.
        """),
        code("""
        xt = tf.constant(xs)
        with tf.GradientTape() as outer:
            outer.watch(xt)
            with tf.GradientTape() as inner:
                inner.watch(xt)
                y_soft = soft_model(xt)
            dy = inner.gradient(y_soft, xt)              # (N, 1): per point, since points are independent
        d2y = outer.batch_jacobian(dy, xt)[:, 0, 0]      # (N,)

        print("batch_jacobian agrees with nbderiv:", np.allclose(d2y, d_soft[2][:, 0, 0, 0], atol=1e-4))
        """),
        code("""
        d_soft.plot(reference={0: xs**2, 1: 2 * xs, 2: np.full_like(xs, 2.0)})
        """),
        md("""
        ## 5. The same story in PyTorch

        A PyTorch MLP on the same data. tanh saturates for inputs as large as 14, so the
        network scales its input to [0, 1] and its output back (a smooth change of variables
        that keeps $d^2y/dx^2$ meaningful). ReLU gives zeros again, tanh gives about 2.
        """),
        code("""
        import torch

        torch.set_num_threads(1)   # networks this small train faster on one thread than on several


        class Scaled(torch.nn.Module):
            \"\"\"y = 196 * net(x / 14): the network works on [0, 1] for x in [0, 14].\"\"\"

            def __init__(self, activation, seed=0):
                super().__init__()
                torch.manual_seed(seed)
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(1, 64), activation(),
                    torch.nn.Linear(64, 64), activation(),
                    torch.nn.Linear(64, 1),
                )

            def forward(self, x):
                return 196 * self.net(x / 14)


        def train_torch(model, steps=2000):
            xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            for _ in range(steps):
                opt.zero_grad()
                loss = ((model(xt) - yt) ** 2).mean()
                loss.backward()
                opt.step()
            return model


        torch_relu = train_torch(Scaled(torch.nn.ReLU))
        torch_tanh = train_torch(Scaled(torch.nn.Tanh))
        """),
        code("""
        points = torch.linspace(2, 13, 45).reshape(-1, 1)
        for name, model in [("ReLU", torch_relu), ("tanh", torch_tanh)]:
            d_t = nbderiv.derivatives(model, points, order=2, check=True)
            mean_d2 = float(d_t[2].mean())
            print(f"{name:5} findings {d_t.codes}, mean d2y/dx2 {round(mean_d2, 1)}, "
                  f"≈ 2 within tolerance: {abs(mean_d2 - 2) < 0.1}, "
                  f"finite differences agree: {d_t.check.passed}")
        """),
        md("""
        ## 6. All three activations in one call

        `nbderiv.compare_activations` trains one small seeded PyTorch network per activation on
        the same target (here $x^2$ on [-2, 2]) and draws each network's derivatives against
        the target's own: ReLU's second derivative is flat zero, the smooth ones follow 2
        inside the training interval and drift near its ends, where nothing pins them down.
        """),
        code("""
        comparison = nbderiv.compare_activations(lambda x: x**2, ("relu", "tanh", "softplus"),
                                                 domain=(-2, 2), progress=False)
        for name, errors in comparison.errors.items():
            print(f"{name:9} mean |d2y/dx2 - 2| = {errors[2]:.1f}")
        comparison.figure
        """),
        md("""
        ## Summary

        - A ReLU network is piecewise linear: its second derivative is 0 almost everywhere,
          whatever it was trained on. This is correct autodiff of that function.
        - `tape.jacobian` of per-point first derivatives is an N x N matrix; its diagonal holds
          the per-point values (`batch_jacobian` gives them directly).
        - For derivatives of order 2 and more, train with a smooth activation, and judge the
          learned derivative by an independent reference: the closed form (2 here) or finite
          differences (`check=True`).
        """),
    ]


# ==============================================================================================
# 02: Case B, grad_outputs=ones
# ==============================================================================================
def case_b():
    return [
        md("""
        # Case B: per-point derivatives with `grad_outputs=ones`

        In a physics-informed network we sample n points, evaluate the network at all of them
        in one batch, and want $\\partial u/\\partial x$ **at each point**. Autograd's
        `grad(y, x, grad_outputs=torch.ones_like(y))` gives exactly that, and it is worth
        knowing why: mathematically the derivative of n outputs with respect to n inputs is an
        n x n Jacobian, and the trick only works because that Jacobian is diagonal.

        Plan: the trick on $y = x_1^2 \\sin x_2$ with its closed form, the Jacobian made
        visible, second derivatives with `create_graph=True`, then a model where the trick
        breaks (BatchNorm in training mode) and how nbderiv catches it.
        """),
        ENV,
        md("""
        ## 1. First derivatives with the ones trick

        100 random points with two inputs each, $y = x_1^2 \\sin x_2$ per point. The closed
        form: $\\partial y/\\partial x_1 = 2 x_1 \\sin x_2$ and
        $\\partial y/\\partial x_2 = x_1^2 \\cos x_2$.
        """),
        code("""
        import torch
        from torch import autograd

        torch.manual_seed(0)
        n = 100
        x = torch.rand(n, 2, requires_grad=True)
        y = x[:, 0] ** 2 * torch.sin(x[:, 1])            # (n,): one value per point

        grad, = autograd.grad(outputs=y, inputs=x, grad_outputs=torch.ones_like(y))

        x1, x2 = x[:, 0].detach(), x[:, 1].detach()
        expected = torch.stack([2 * x1 * torch.sin(x2), x1**2 * torch.cos(x2)], dim=1)
        print(grad.shape)
        print("matches the closed form:", torch.allclose(grad, expected, rtol=1e-6, atol=1e-7))
        """),
        md("""
        (On this stack the two even agree bit for bit, `torch.equal`; `allclose` is the
        comparison that survives a change of hardware or library version.)

        ## 2. Why it works: the Jacobian is diagonal

        `grad(y, x, grad_outputs=v)` computes the vector-Jacobian product $v^T J$ with
        $J_{nm} = \\partial y_n / \\partial x_m$ (per input feature). With $v$ all ones that
        is the sum over n of each column: $\\sum_n \\partial y_n/\\partial x_m$. Point n's
        output depends only on point n's input, so every term with $n \\ne m$ is zero and the
        sum is the one term we want, $\\partial y_m / \\partial x_m$.

        `nbderiv.full_jacobian` builds the whole cross-sample Jacobian,
        shape (point n, output, point m, input), and `plot_jacobian` draws it: only the
        diagonal blocks are non-zero.
        """),
        code("""
        import numpy as np

        import nbderiv


        def f(x):                         # the same function as a model: (N, 2) -> (N, 1)
            return (x[:, 0] ** 2 * torch.sin(x[:, 1])).unsqueeze(1)


        few = x[:6].detach()
        J = nbderiv.full_jacobian(f, few)
        off_diagonal = J.copy()
        for k in range(len(few)):
            off_diagonal[k, :, k, :] = 0
        print("full Jacobian:", J.shape)
        print("off-diagonal blocks all zero:", bool((off_diagonal == 0).all()))
        print("ones trick = column sums:", np.allclose(J.sum(axis=0)[0], grad[:6].numpy()))
        """),
        code("""
        nbderiv.plot_jacobian(f, few)
        """),
        md("""
        ## 3. Second derivatives need `create_graph=True`

        To differentiate $\\partial y/\\partial x_1$ again, the first `grad` must build a graph
        for its own result (`create_graph=True`). Expected:
        $\\partial^2 y/\\partial x_1^2 = 2\\sin x_2$ and
        $\\partial^2 y/\\partial x_1 \\partial x_2 = 2 x_1 \\cos x_2$.

        One trap first, if you run the two steps one after the other on the same `y`: the
        first `grad` call (without `retain_graph` or `create_graph`) already freed `y`'s
        graph, so a second call on it fails. Recompute `y` (or keep the graph) instead.
        """),
        code("""
        try:
            autograd.grad(y, x, grad_outputs=torch.ones_like(y), create_graph=True)
        except RuntimeError as err:
            print("RuntimeError, graph already freed:", "second time" in str(err))
        """),
        code("""
        y = x[:, 0] ** 2 * torch.sin(x[:, 1])            # a fresh graph
        grad, = autograd.grad(y, x, grad_outputs=torch.ones_like(y), create_graph=True)
        grad2, = autograd.grad(grad[:, 0], x, grad_outputs=torch.ones_like(grad[:, 0]))

        expected2 = torch.stack([2 * torch.sin(x2), 2 * x1 * torch.cos(x2)], dim=1)
        print(grad2.shape)
        print("matches the closed form:", torch.allclose(grad2, expected2, rtol=1e-6, atol=1e-6))
        """),
        md("""
        ## 4. nbderiv: every derivative, axes named

        `%nnderiv f x` returns first derivatives (point, output, input) and the full Hessian
        per point (point, output, input, input). nbderiv names the two inputs `x[0]` and
        `x[1]` (our $x_1$ and $x_2$). Both are checked against the closed form; the Hessian is
        $\\begin{pmatrix} 2\\sin x_2 & 2x_1\\cos x_2 \\\\ 2x_1\\cos x_2 & -x_1^2\\sin x_2
        \\end{pmatrix}$.
        """),
        code("""
        %load_ext nbderiv

        d = %nnderiv f x
        """),
        code("""
        hessian = torch.stack([
            torch.stack([2 * torch.sin(x2), 2 * x1 * torch.cos(x2)], dim=1),
            torch.stack([2 * x1 * torch.cos(x2), -x1**2 * torch.sin(x2)], dim=1),
        ], dim=1)                                           # (n, 2, 2)
        print("d[1] matches the closed form:", np.allclose(d[1][:, 0], expected.numpy(), atol=1e-6))
        print("d[2] matches the closed form:", np.allclose(d[2][:, 0], hessian.numpy(), atol=1e-6))
        """),
        code("""
        d.plot()
        """),
        md("""
        ## 5. Where the trick breaks: points that see each other

        The diagonal Jacobian is an assumption about the model. BatchNorm in training mode
        normalises each feature with the mean and variance **of the batch**, so every output
        depends on every input. Then the ones trick returns column sums that include the
        cross terms $\\partial y_n/\\partial x_m$, $n \\ne m$, and the numbers are simply wrong,
        with no error anywhere.
        """),
        code("""
        torch.manual_seed(0)
        bn_net = torch.nn.Sequential(
            torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 1),
        )                                   # a fresh module is in training mode
        xb = x[:8].detach().clone().requires_grad_(True)
        yb = bn_net(xb)
        ones_trick, = autograd.grad(yb, xb, grad_outputs=torch.ones_like(yb))

        # The truth: the per-point blocks of the full Jacobian (8, 1, 8, 2), other points held fixed.
        Jb = torch.autograd.functional.jacobian(bn_net, xb.detach())
        per_point = torch.stack([Jb[k, 0, k] for k in range(len(xb))])
        print("largest per-point derivative:     ", round(per_point.abs().max().item(), 2))
        print("largest error of the ones trick:  ", round((ones_trick - per_point).abs().max().item(), 2))
        """),
        md("""
        nbderiv probes for this before trusting the trick: it perturbs one point and watches
        the others. Here it raises `coupled-samples` (and `train-mode`), computes the true
        per-point blocks instead, and puts BatchNorm's running statistics back (each forward
        pass in training mode updates them).
        """),
        code("""
        running_mean = bn_net[1].running_mean.clone()
        d_bn = %nnderiv bn_net xb --order 1
        """),
        code("""
        print(d_bn.codes)
        print("nbderiv gives the per-point blocks:", np.allclose(d_bn[1][:, 0], per_point.numpy(), atol=1e-5))
        print("running statistics untouched:", torch.equal(running_mean, bn_net[1].running_mean))
        """),
        code("""
        nbderiv.plot_jacobian(bn_net, xb.detach())
        """),
        md("""
        A curious consequence: the ones trick's *second* derivative of this model is zero up
        to rounding. Summing over all points differentiates along a shift of every point at
        once, and BatchNorm cancels exactly such a shift. Zero again, like ReLU in notebook
        [01](01_relu_second_derivative.ipynb), for a completely different reason.
        """),
        code("""
        yb = bn_net(xb)
        g1, = autograd.grad(yb, xb, grad_outputs=torch.ones_like(yb), create_graph=True)
        g2, = autograd.grad(g1[:, 0], xb, grad_outputs=torch.ones_like(g1[:, 0]))
        print("ones-trick second derivative ≈ 0:", g2.abs().max().item() < 1e-4)
        """),
        md("""
        ## 6. The fix

        In evaluation mode BatchNorm uses its stored statistics, each point is processed on its
        own, the Jacobian is diagonal again and the ones trick is right. nbderiv has nothing
        left to report.
        """),
        code("""
        bn_net.eval()
        ye = bn_net(xb)
        ones_eval, = autograd.grad(ye, xb, grad_outputs=torch.ones_like(ye))
        d_eval = nbderiv.derivatives(bn_net, xb, order=2, check=True)
        print("findings:", d_eval.codes)
        print("ones trick = nbderiv:", np.allclose(ones_eval.numpy(), d_eval[1][:, 0], atol=1e-6))
        print("finite differences agree:", d_eval.check.passed)
        """),
        md("""
        ## Summary

        - `grad_outputs=ones` returns column sums of the n x n Jacobian; they are the
          per-point derivatives exactly when each output depends only on its own input.
        - Second derivatives need `create_graph=True` on the first call, and a graph is freed
          after one backward pass unless you keep it.
        - Batch statistics (BatchNorm in training mode and friends) break the assumption
          silently. nbderiv checks it (`coupled-samples`); `model.eval()` restores it.
        """),
    ]


# ==============================================================================================
# 03: Case C, a second derivative checked against its closed form
# ==============================================================================================
def case_c():
    return [
        md("""
        # Case C: a second derivative, checked against its closed form

        A widely copied answer shows how to take a second derivative in PyTorch: for
        $y = x^3 + 2x^2 + 1$ at $x = 2$, call `torch.autograd.grad` with `create_graph=True`,
        then again. It prints `tensor([12.])`. **That printed answer is wrong.** Running the
        code gives 16, and so does the closed form: $y'' = 6x + 4 = 16$ at $x = 2$ (the first
        derivative is $3x^2 + 4x = 20$). 12 would be the second derivative of $x^3$ alone.

        The lesson of this notebook: check a derivative against something independent (the
        closed form, finite differences, a second route) before trusting it, whoever printed it.
        """),
        ENV,
        md("""
        ## 1. Run the code

        Nested `autograd.grad`: the first call must keep its graph (`create_graph=True`) so its
        result can be differentiated again.
        """),
        code("""
        import torch

        x = torch.tensor([2.0], requires_grad=True)
        y = x**3 + 2 * x**2 + 1

        dy_dx, = torch.autograd.grad(y, x, create_graph=True)
        d2y_dx2, = torch.autograd.grad(dy_dx, x)

        print("dy/dx   =", dy_dx.item())
        print("d2y/dx2 =", d2y_dx2.item())
        """),
        md("""
        ## 2. Check against the closed form

        $y' = 3x^2 + 4x$ and $y'' = 6x + 4$. At $x = 2$ they are 20 and 16, exactly what
        autograd printed (these are small integers, exact in float32).
        """),
        code("""
        def closed_form(x):
            return 3 * x**2 + 4 * x, 6 * x + 4


        first, second = closed_form(2.0)
        print("closed form:", first, second)
        print("autograd matches the closed form:", dy_dx.item() == first and d2y_dx2.item() == second)
        """),
        md("""
        A second, independent check that needs no calculus at all: central finite differences
        in float64, $f''(x) \\approx (f(x+h) - 2f(x) + f(x-h)) / h^2$.
        """),
        code("""
        def f(x):
            return x**3 + 2 * x**2 + 1


        h = 1e-3
        fd_first = (f(2 + h) - f(2 - h)) / (2 * h)
        fd_second = (f(2 + h) - 2 * f(2) + f(2 - h)) / h**2
        print("finite differences:", round(fd_first, 4), round(fd_second, 4))
        """),
        md("""
        ## 3. The answer's second snippet is wrong too

        It differentiates $y = x^3 + x^2$ at $x = 2$, prints a first derivative of 16 (right:
        $3x^2 + 2x = 16$) and a second derivative of 12 (wrong: $6x + 2 = 14$). It also
        imports a third-party `autograd_hessian` package, which is not needed (PyTorch has
        Hessians built in, below) and is not installed here. And it calls `y.backward()`
        before `grad(y, x, ...)`: `backward` frees the graph, so the `grad` call fails.
        """),
        code("""
        import importlib.util

        print("autograd_hessian installed:", importlib.util.find_spec("autograd_hessian") is not None)

        x = torch.tensor([2.0], requires_grad=True)
        y = x**3 + x**2
        y.backward()                                  # frees the graph ...
        try:
            torch.autograd.grad(y, x, create_graph=True)  # ... so this cannot run
        except RuntimeError as err:
            print("RuntimeError, graph already freed:", "second time" in str(err))
        """),
        md("""
        The working version, with the closed form beside it:
        """),
        code("""
        x = torch.tensor([2.0], requires_grad=True)
        y = x**3 + x**2
        dy_dx, = torch.autograd.grad(y, x, create_graph=True)
        d2y_dx2, = torch.autograd.grad(dy_dx, x)
        print("autograd:   ", dy_dx.item(), d2y_dx2.item())
        print("closed form:", 3 * 2**2 + 2 * 2, 6 * 2 + 2)
        """),
        md("""
        ## 4. Built-in Hessian routes

        For a function with a scalar output, the Hessian is the matrix of second derivatives;
        with one input it is 1 x 1. PyTorch has two built-in routes: the older
        `torch.autograd.functional.hessian` and `torch.func.hessian`. Both need a scalar
        output, hence `.sum()` over the single element.
        """),
        code("""
        x0 = torch.tensor([2.0])

        H_functional = torch.autograd.functional.hessian(lambda z: f(z).sum(), x0)
        H_func = torch.func.hessian(lambda z: f(z).sum())(x0)

        print("torch.autograd.functional.hessian:", H_functional.shape, H_functional.item())
        print("torch.func.hessian:               ", H_func.shape, H_func.item())
        """),
        md("""
        ## 5. nbderiv

        `%nnderiv` takes any PyTorch callable. One point with one feature, shape (1, 1); order
        3 for good measure ($y''' = 6$), and `--check` compares every order with float64
        finite differences.
        """),
        code("""
        %load_ext nbderiv
        import nbderiv

        x0 = torch.tensor([[2.0]])
        d = %nnderiv f x0 --order 3 --check
        """),
        code("""
        print("orders 1, 2, 3:", [d[k].item() for k in (1, 2, 3)])
        print("closed form:   ", [20.0, 16.0, 6.0])
        print("finite differences agree:", d.check.passed)
        """),
        md("""
        Over an interval, with the closed forms drawn dashed as the reference:
        """),
        code("""
        xs = torch.linspace(-3, 2, 101).reshape(-1, 1)
        d_curve = nbderiv.derivatives(f, xs, order=2)
        first, second = closed_form(xs.numpy())
        d_curve.plot(reference={1: first, 2: second})
        """),
        md("""
        ## 6. One more closed form: arctan

        The same answer continues with a "PINN for arctan" whose code does not run (it trains
        nothing it evaluates and calls an undefined helper). The question behind it is simple:
        $\\frac{d}{dx}\\arctan x = \\frac{1}{1+x^2}$ and
        $\\frac{d^2}{dx^2}\\arctan x = \\frac{-2x}{(1+x^2)^2}$. Checked at 101 points:
        """),
        code("""
        import numpy as np

        xa = torch.linspace(-4, 4, 101, dtype=torch.float64).reshape(-1, 1)
        d_atan = nbderiv.derivatives(torch.atan, xa, order=2)
        u = xa.numpy()[:, 0]
        print("first derivative matches 1/(1+x^2):     ",
              np.allclose(d_atan[1][:, 0, 0], 1 / (1 + u**2), rtol=1e-12))
        print("second derivative matches -2x/(1+x^2)^2:",
              np.allclose(d_atan[2][:, 0, 0, 0], -2 * u / (1 + u**2) ** 2, rtol=1e-12, atol=1e-15))
        """),
        md("""
        ## Summary

        - For $x^3 + 2x^2 + 1$ at 2: first derivative 20, second 16 (not 12). For $x^3 + x^2$:
          16 and 14 (not 12).
        - Nested `autograd.grad` with `create_graph=True`, the two built-in Hessians and
          nbderiv all agree with the closed form and with finite differences.
        - Whatever computed a derivative, compare it with something independent before
          believing it: a closed form when there is one, finite differences (`check=True`)
          always.
        """),
    ]


# ==============================================================================================
# 04: Case D, Jacobian shapes in a PINN
# ==============================================================================================
def case_d():
    return [
        md("""
        # Case D: Jacobian of a Jacobian: zeros and odd shapes in a PINN

        A physics-informed network `1 -> 50 -> 50 -> 50 -> 501` (one input x, 501 outputs,
        ReLU). The author wants $du/dx$ and $d^2u/dx^2$ with
        `torch.autograd.functional.jacobian`, gets a first Jacobian of shape (501, 1), a second
        of shape (501, 1, 1) that is all zeros, and two questions: why zeros, and where do the
        extra dimensions come from?

        There are two separate causes of the zeros (one of them survives switching to Tanh),
        and one simple rule for the shapes.
        """),
        ENV,
        md("""
        ## 1. Reproduce it

        The question's network, in our own words (its `print` lines also miss a closing
        parenthesis; the code below runs as is).
        """),
        code("""
        import torch
        from torch import nn
        from torch.autograd.functional import jacobian

        torch.set_num_threads(1)   # many tiny backward passes: one thread is faster than several


        class PINN(nn.Module):
            def __init__(self, sizes, activation=nn.ReLU):
                super().__init__()
                layers = []
                for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
                    layers += [nn.Linear(n_in, n_out), activation()]
                layers.append(nn.Linear(sizes[-2], sizes[-1]))
                self.layers = nn.Sequential(*layers)

            def forward(self, x):
                return self.layers(x)


        sizes = [1, 50, 50, 50, 501]
        torch.manual_seed(0)
        pinn = PINN(sizes)
        x = torch.randn(1)                                   # one point, shape (1,)

        u_x = jacobian(pinn, x, create_graph=True)
        u_xx = jacobian(lambda _: u_x, x)                    # as in the question
        print("u_x: ", tuple(u_x.shape))
        print("u_xx:", tuple(u_xx.shape), "all zero:", bool((u_xx == 0).all()))
        """),
        md("""
        ## 2. Why zeros: two causes

        **ReLU.** A ReLU network is piecewise linear in its input, so its second derivative is
        0 almost everywhere (notebook [01](01_relu_second_derivative.ipynb) shows it in
        detail). Switching to `nn.Tanh` is the right move, but not enough here:

        **The lambda ignores its argument.** `jacobian(lambda _: u_x, x)` differentiates a
        function that returns the same precomputed tensor whatever it is given: its derivative
        is zero for any network. The outer Jacobian must differentiate a function that
        *computes* the inner Jacobian from its input:
        `jacobian(lambda z: jacobian(pinn, z, create_graph=True), x)`.
        """),
        code("""
        torch.manual_seed(0)
        pinn_tanh = PINN(sizes, nn.Tanh)

        u_x = jacobian(pinn_tanh, x, create_graph=True)
        ignored = jacobian(lambda _: u_x, x)
        print("Tanh, lambda _: u_x    all zero:", bool((ignored == 0).all()), tuple(ignored.shape))

        # The correct nesting, for the first 10 of the 501 outputs (see the note below).
        nested = jacobian(lambda z: jacobian(pinn_tanh, z, create_graph=True)[:10], x)
        print("Tanh, nested jacobian  all zero:", bool((nested == 0).all()), tuple(nested.shape))
        nested_relu = jacobian(lambda z: jacobian(pinn, z, create_graph=True)[:10], x)
        print("ReLU, nested jacobian  all zero:", bool((nested_relu == 0).all()))
        """),
        md("""
        A note on cost: the outer reverse-mode Jacobian runs one backward pass per output
        element, each through the inner Jacobian's 501 backward passes. For all 501 outputs
        that is about a minute on this CPU, hence `[:10]` above. The routes below compute the
        same numbers in a second or so.
        """),
        md("""
        ## 3. Where the shapes come from

        A generalised Jacobian has shape `output.shape + input.shape`. The output has shape
        (501,) and x has shape (1,), so $du/dx$ is (501, 1): one row per output, one column
        per input element. Differentiating that (501, 1) tensor again with respect to the
        (1,)-shaped x appends x's shape once more: (501, 1, 1). Nothing is "useless": the
        last two axes are the two differentiations, each of size 1 because x has one element.

        The rule in action, for other input shapes:
        """),
        code("""
        x3 = torch.randn(3, 1)                   # three points, as a batch (3, 1)
        print("x (1,)   ->", tuple(jacobian(pinn_tanh, x).shape))
        print("x (1, 1) ->", tuple(jacobian(pinn_tanh, x.reshape(1, 1)).shape))
        print("x (3, 1) ->", tuple(jacobian(pinn_tanh, x3).shape), " (point, output, point, input)")
        """),
        md("""
        With a batch, the Jacobian also has a point axis on each side: (3, 501, 3, 1) holds
        $\\partial u_n / \\partial x_m$ for every pair of points, and only $n = m$ is non-zero.
        Three ways to get exactly what you need:
        - `squeeze`/`flatten` when you know the size-1 axes are the input's;
        - `torch.func.vmap` over points of a per-point `jacrev`/`hessian`, which never builds
          the cross-point blocks;
        - `torch.func.hessian(pinn)(x)` for a single point: shape (501, 1, 1) directly.
          The older `torch.autograd.functional.hessian` needs a scalar output: it raises for
          501 outputs, and works per output (`lambda z: pinn(z)[k]`).
        """),
        code("""
        from torch.func import hessian, jacrev, vmap

        print("vmap(jacrev):  ", tuple(vmap(jacrev(pinn_tanh))(x3).shape))
        print("vmap(hessian): ", tuple(vmap(hessian(pinn_tanh))(x3).shape))
        H = hessian(pinn_tanh)(x)
        print("func.hessian:  ", tuple(H.shape), " equals the nested jacobian:", torch.allclose(H[:10], nested))
        try:
            torch.autograd.functional.hessian(pinn_tanh, x)
        except RuntimeError as err:
            print("autograd.functional.hessian, 501 outputs: RuntimeError, needs a single element:",
                  "single element" in str(err))
        H7 = torch.autograd.functional.hessian(lambda z: pinn_tanh(z)[7], x)
        print("autograd.functional.hessian, output 7:", tuple(H7.shape),
              " equals:", torch.allclose(H7, nested[7]))
        """),
        md("""
        ## 4. nbderiv: named axes

        nbderiv always returns per-point arrays with the same layout:
        `d[k]` is (point, output, input, ..., input), and `d.axes(k)` says so. For 50 points
        of the Tanh PINN, `d[2]` is (50, 501, 1, 1): 50 points, 501 outputs, and the input
        axis twice. The summary names the axes; `--check` compares with finite differences.
        """),
        code("""
        %load_ext nbderiv
        import nbderiv

        xs = torch.linspace(-2, 2, 50).reshape(-1, 1)
        d = %nnderiv pinn_tanh xs --check
        """),
        code("""
        import numpy as np

        print(d.axes(1), d[1].shape)
        print(d.axes(2), d[2].shape)
        reference = vmap(hessian(pinn_tanh))(xs).detach().numpy()      # (50, 501, 1, 1)
        print("d[2] equals vmap(hessian):", np.allclose(d[2], reference, atol=1e-6))
        print("finite differences agree:", d.check.passed)
        """),
        md("""
        The ReLU PINN: nbderiv recognises the piecewise-linear network and says why its
        second derivative vanishes.
        """),
        code("""
        d_relu = %nnderiv pinn xs
        """),
        code("""
        print(d_relu.codes)
        print("second derivative all zero:", bool((d_relu[2] == 0).all()))
        """),
        md("""
        Three of the 501 outputs and their derivatives along x, for the Tanh PINN:
        """),
        code("""
        d.plot(output=[0, 1, 2])
        """),
        md("""
        ## Summary

        - Zeros had two causes: ReLU (piecewise linear, so $u'' = 0$) and an outer Jacobian of
          a function that ignored its argument (zero even with Tanh). Nest the calls:
          `jacobian(lambda z: jacobian(pinn, z, create_graph=True), x)`.
        - Shapes follow `output.shape + input.shape`, once per differentiation; with a batch,
          point axes appear on both sides. `vmap` over per-point `jacrev`/`hessian` or
          nbderiv's `(point, output, input, ...)` layout avoid the guesswork.
        """),
    ]


NOTEBOOKS = {
    "00_tour": tour,
    "01_relu_second_derivative": case_a,
    "02_grad_outputs_ones": case_b,
    "03_second_derivative_scalar": case_c,
    "04_jacobian_shapes_pinn": case_d,
}


# ==============================================================================================
def build(name: str):
    """The notebook ``name`` (cells only, no outputs) as an nbformat node."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNEL)
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source, tags) in enumerate(NOTEBOOKS[name]()):
        cell = (nbformat.v4.new_markdown_cell(source) if kind == "markdown"
                else nbformat.v4.new_code_cell(source))
        cell["id"] = f"c{i:02d}"
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    return nb


def execute(nb, timeout: int = 300) -> None:
    """Run every cell in a fresh kernel started in this folder, storing outputs."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()


def main(argv=None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description="Write (and execute) the tutorial notebooks.")
    parser.add_argument("only", nargs="*", help="build only notebooks whose name starts so")
    parser.add_argument("--no-execute", action="store_true", help="write cells without outputs")
    args = parser.parse_args(argv)
    for name in NOTEBOOKS:
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        nb = build(name)
        start = time.perf_counter()
        if not args.no_execute:
            execute(nb)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"{name}.ipynb: {len(nb.cells)} cells, executed in "
              f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
