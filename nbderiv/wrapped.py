"""What a wrapped model holds: the objects inside a lambda, ``functools.partial``, bound
method, closure or callable object, so that ``lambda z: net(z.reshape(-1, 3, 8, 8))`` gets
the same framework detection, findings and state restoration as ``net`` itself.

Framework-free: it imports no framework and never looks inside a framework object (one
whose class, or a base class, comes from ``torch``, ``tensorflow``, ``keras``, ...), whose
own structure the backends know. Nothing is called; attributes are read from ``__dict__``
and cells, never through ``__getattr__`` or properties.

>>> import functools
>>> class Net:  # stands for a torch / Keras model
...     def __call__(self, x):
...         return x
>>> net = Net()
>>> objects_inside(lambda z: net(z)) == [net]
True
>>> objects_inside(functools.partial(lambda m, z: m(z), net)) == [net]
True

:func:`user_frames` reads the same things (closure cells, globals) from the frames of a
traceback, for the messages of a model that failed.
"""

from __future__ import annotations

import dis
import functools
import inspect
import os
import sys
import types
from typing import NamedTuple

# top-level packages whose objects are models, tensors or framework internals: returned when
# found, never looked into (their backend knows their structure)
FRAMEWORK_PACKAGES = frozenset({"torch", "tensorflow", "keras", "tf_keras", "jax", "jaxlib",
                                "flax", "numpy"})
# packages whose frames are not the user's own code when a model call fails (nbderiv's own
# frames are told by their file, so that code in its docstrings counts as the user's)
_NOT_USER = FRAMEWORK_PACKAGES | frozenset(getattr(sys, "stdlib_module_names", ()))
_MAX_ITEMS = 64  # items of a list / tuple / dict looked at, per container

_FUNCTIONS = (types.FunctionType, types.MethodType, functools.partial,
              types.BuiltinFunctionType, types.BuiltinMethodType)
FUNCTIONS = _FUNCTIONS  # what a wrapper around a model can be
_CONTAINERS = (list, tuple, set, frozenset, dict)
_SKIP = (types.ModuleType, type, types.CodeType, types.CellType, str, bytes, int, float,
         complex, bool, type(None), type(Ellipsis))


def is_framework_object(obj) -> bool:
    """Whether ``obj``'s class or one of its base classes is defined in a framework package
    (answered from the classes' ``__module__`` alone, without importing anything)."""
    for cls in type(obj).__mro__:
        root = (getattr(cls, "__module__", None) or "").split(".")[0]
        if root in FRAMEWORK_PACKAGES:
            return True
    return False


def uncompiled(model):
    """The model that ``torch.compile`` was given, for a compiled module (an
    ``OptimizedModule``: its ``_orig_mod``) or a compiled function (its
    ``_torchdynamo_orig_callable``, followed as torch itself follows it); else ``model``
    itself. Its derivatives are those of the compiled one (the same parameters), and nested
    autodiff runs on it where compiled backward graphs refuse ``create_graph``. Read from
    the classes' names and the objects' own ``__dict__``: nothing is imported or called.

    >>> def f(z):
    ...     return z
    >>> def compiled(z):  # what torch.compile(f) returns, in short
    ...     return f(z)
    >>> compiled._torchdynamo_orig_callable, compiled._torchdynamo_wrapper_id = f, id(compiled)
    >>> uncompiled(compiled) is f, uncompiled(f) is f
    (True, True)
    """
    for _ in range(8):  # torch.compile of a torch.compile'd function: each layer
        cls = type(model)
        try:
            own = object.__getattribute__(model, "__dict__")
        except (AttributeError, TypeError):
            return model
        if not isinstance(own, dict):
            return model
        if cls.__name__ == "OptimizedModule" and \
                (getattr(cls, "__module__", "") or "").startswith("torch._dynamo"):
            inner = (own.get("_modules") or {}).get("_orig_mod")
        elif own.get("_torchdynamo_wrapper_id") == id(model):  # not a functools.wraps copy
            inner = own.get("_torchdynamo_orig_callable")
        else:
            return model
        if inner is None or not callable(inner):
            return model
        model = inner
    return model


@functools.lru_cache(maxsize=2048)
def code_names(code) -> frozenset:
    """The global names a code object and the code nested in it load (``LOAD_GLOBAL``,
    ``LOAD_NAME``): not the attribute names it reads (``s.net`` loads no global ``net``).

    >>> sorted(code_names((lambda z: trainer.model(z) + [w for w in weights][0]).__code__))
    ['trainer', 'weights']
    """
    return _loaded(code, ("LOAD_GLOBAL", "LOAD_NAME"))


_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None))


def weakly_held(value) -> bool:
    """Whether ``value`` can be held weakly: the others (lists, dicts, numbers) are named in
    a key by identity and never held, so that nothing in a cache keeps a model alive."""
    return type(value).__weakrefoffset__ != 0


def code_state(fn, depth: int = 2) -> tuple:
    """(key, objects): what a trace of ``fn`` bakes in from Python: the values of the plain
    numbers and strings its code reads (globals, closure cells, defaults, the attributes it
    reads of your modules and classes, the own attributes of a callable object or a bound
    method's object), and the identity of every other object among them (a model rebound to
    a new one, a tensor replaced); functions it calls, ``depth`` levels down. A trace made
    with ``k = 1.0`` computes with 1.0 after ``k = 3.0``: the key tells them apart.

    >>> k = 1.0
    >>> f = lambda z: z * k
    >>> before = code_state(f)[0]
    >>> k = 3.0
    >>> code_state(f)[0] == before
    False
    """
    parts, objects, seen = [], [], set()

    def value(v, inner=True):
        if isinstance(v, _PLAIN_VALUES):
            return v
        if inner and type(v) in (list, tuple, dict) and len(v) <= _MAX_ITEMS:
            # a container read by the code: its items (a model kept in a dict and replaced)
            items = v.items() if isinstance(v, dict) else enumerate(v)
            return (type(v).__name__,) + tuple(
                (k if isinstance(k, _PLAIN_VALUES) else id(k), value(i, False))
                for k, i in items)
        if weakly_held(v):
            objects.append(v)
        return ("id", id(v))

    def attributes(obj):
        for name, v in own_attributes(obj):
            parts.append((name, value(v)))

    def visit(f, level):
        if id(f) in seen or level < 0:
            return
        seen.add(id(f))
        if isinstance(f, types.MethodType):
            visit(f.__func__, level)
            attributes(f.__self__)
        elif isinstance(f, functools.partial):
            visit(f.func, level)
            parts.extend(value(a) for a in f.args)
            parts.extend((k, value(v)) for k, v in f.keywords.items())
        elif isinstance(f, types.FunctionType):
            if framework_function(f):  # the framework's code: by identity only
                parts.append(("id", id(f)))
                return
            code = f.__code__
            parts.append(("code", id(code)))
            for cell in f.__closure__ or ():
                try:
                    held = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                parts.append(value(held))
                if isinstance(held, _FUNCTIONS):
                    visit(held, level - 1)
            parts.extend(value(v) for v in f.__defaults__ or ())
            g, names = f.__globals__, attribute_names(code)
            for name in sorted(code_names(code)):
                if name not in g:
                    continue
                held = g[name]
                if isinstance(held, (types.ModuleType, type)):
                    parts.extend((f"{name}.{a}", value(v)) for a, v in read_through(held, names))
                    continue
                parts.append((name, value(held)))
                if isinstance(held, _FUNCTIONS):
                    visit(held, level - 1)
        elif callable(f) and not isinstance(f, (type, types.BuiltinFunctionType)):
            attributes(f)  # a callable object (a tf.Module): its settings
            call = inspect.getattr_static(type(f), "__call__", None)
            if isinstance(call, types.FunctionType):
                visit(call, level)

    visit(fn, depth)
    return tuple(parts), objects


@functools.lru_cache(maxsize=2048)
def attribute_names(code) -> frozenset:
    """The attribute names a code object and the code nested in it read (``cfg.center``,
    ``mymodels.net(z)``: ``center``, ``net``).

    >>> sorted(attribute_names((lambda z: models.net(z) * CFG.scale).__code__))
    ['net', 'scale']
    """
    return _loaded(code, ("LOAD_ATTR", "LOAD_METHOD"))


def _loaded(code, opnames) -> frozenset:
    """The names the instructions ``opnames`` of a code object and the code nested in it
    take."""
    names = {ins.argval for ins in dis.get_instructions(code)
             if ins.opname in opnames and isinstance(ins.argval, str)}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _loaded(const, opnames)
    return frozenset(names)


def _user_module(value) -> bool:
    """A module of the user's own (``import config``, ``import mymodels``): not a framework's
    nor the standard library's."""
    return isinstance(value, types.ModuleType) and \
        (getattr(value, "__name__", "") or "").split(".")[0] not in _NOT_USER


def user_class(value) -> bool:
    """A class of the user's own (``class CFG: ...``), not a framework's nor a builtin."""
    return isinstance(value, type) and \
        (getattr(value, "__module__", "") or "").split(".")[0] not in _NOT_USER | {"builtins"}


def read_through(holder, names) -> list:
    """(name, value) of the attributes ``names`` of a module or class of the user's own
    (``config.CENTER``, ``Cfg.net``), read from the module's or the classes' own
    ``__dict__`` (nothing is called; a class's attributes from its bases of the user's own
    too); [] for anything else."""
    if _user_module(holder):
        own = vars(holder)
        return [(n, own[n]) for n in sorted(names) if n in own and not n.startswith("__")]
    if user_class(holder):
        out = []
        for n in sorted(names):
            if n.startswith("__"):
                continue
            for c in holder.__mro__:
                if not user_class(c):
                    continue
                if n in vars(c):
                    out.append((n, vars(c)[n]))
                    break
        return out
    return []


def framework_function(fn) -> bool:
    """Whether ``fn`` is a function defined in a framework package (``F.relu``)."""
    return (getattr(fn, "__module__", "") or "").split(".")[0] in FRAMEWORK_PACKAGES


def _function_parts(fn) -> list:
    """A plain function's closure cells, default values, ``__wrapped__``, and the globals its
    code names (looked up in its own globals; builtins are not)."""
    parts = []
    for cell in fn.__closure__ or ():
        try:
            parts.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name assigned later)
            pass
    parts += list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    own = vars(fn)
    if "__wrapped__" in own:
        parts.append(own["__wrapped__"])
    g = fn.__globals__
    held = [g[name] for name in sorted(code_names(fn.__code__)) if name in g]
    attributes = attribute_names(fn.__code__)
    # the attributes its code reads of a module or class of the user's own (mymodels.net,
    # Cfg.net): the module and the class themselves are not looked into as a whole
    for value in held + parts:
        parts += [v for _, v in read_through(value, attributes)]
    return parts + held


def own_attributes(obj, most: int | None = _MAX_ITEMS) -> list:
    """(name, value) of an object's own ``__dict__``, or of its ``__slots__`` (not
    properties, not ``__getattr__``; a slot never set is left out), at most ``most`` (None:
    all)."""
    try:
        own = object.__getattribute__(obj, "__dict__")
    except (AttributeError, TypeError):
        own = None
    if isinstance(own, dict):
        return list(own.items())[:most]
    items = []
    for cls in type(obj).__mro__:
        slots = vars(cls).get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else list(slots):
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                items.append((name, object.__getattribute__(obj, name)))
            except AttributeError:  # a slot never set
                pass
    return items[:most]


def _attributes(obj) -> list:
    return [value for _, value in own_attributes(obj)]


def _parts(obj, looked_into: bool) -> list:
    """The objects directly inside ``obj``. ``looked_into``: ``obj`` is an object of the
    user's (not a function), whose own attributes count."""
    if isinstance(obj, types.FunctionType):
        return _function_parts(obj)
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        owner = getattr(obj, "__self__", None)
        return [] if owner is None or isinstance(owner, types.ModuleType) else [owner]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)[:_MAX_ITEMS]
    if isinstance(obj, dict):
        return list(obj.values())[:_MAX_ITEMS]
    if not looked_into:
        return []
    parts = _attributes(obj)
    call = inspect.getattr_static(type(obj), "__call__", None)
    if isinstance(call, types.FunctionType):  # a class's own __call__: its globals, closure
        parts.append(call)
    return parts


def objects_inside(fn, depth: int = 5) -> list:
    """The objects that ``fn`` holds, up to ``depth`` steps in, each once (by identity), in
    the order found: closure cells, default values, ``__self__``, ``functools.partial`` func /
    args / keywords, ``__wrapped__``, the globals its code names (nested functions included),
    the attributes of the objects of your own among them (``self.net`` in ``lambda z:
    self.net(z)``, ``trainer.model``), and the items of lists, tuples and dicts. Functions, containers, modules,
    classes and plain scalars are looked into or left out, never returned; framework objects
    are returned but never looked into; nothing is imported.

    >>> objects_inside(abs)
    []
    >>> class Net:
    ...     pass
    >>> nets = [Net(), 1.5]
    >>> objects_inside(lambda x: x * nets[1]) == [nets[0]]
    True
    """
    if is_framework_object(fn):
        return []
    found, seen = [], {id(fn)}
    level = [(fn, True)]
    for _ in range(max(0, depth)):
        below = []
        for obj, looked_into in level:
            for part in _parts(obj, looked_into):
                if id(part) in seen or isinstance(part, _SKIP):
                    continue
                seen.add(id(part))
                if not isinstance(part, _FUNCTIONS + _CONTAINERS):  # looked into, not finds
                    found.append(part)
                if is_framework_object(part):
                    continue
                # objects of your own (a bound method's __self__, a callable object, a
                # trainer or config object a closure or global holds): their attributes count
                below.append((part, not isinstance(part, _FUNCTIONS)))
        level = below
    return found


_NBDERIV = os.path.dirname(os.path.abspath(__file__)) + os.sep


def with_replaced(fn, replace):
    """A copy of the wrapper ``fn`` (lambda, closure, function, ``functools.partial``, bound
    method) that holds ``replace(obj)`` wherever it held an object ``replace`` gives a
    replacement for (not None): in closure cells, the globals its code names, a partial's
    arguments, a method's ``__self__``. Each object is replaced once (shared ones stay
    shared). None where nothing was replaced; ``fn`` itself is never changed.

    >>> net, other = object(), object()
    >>> f = lambda z: (net, z)
    >>> g = with_replaced(f, lambda obj: other if obj is net else None)
    >>> g(1)[0] is other, f(1)[0] is net
    (True, True)
    """
    done = {}

    def swap(obj):
        if id(obj) not in done:
            new = replace(obj)
            done[id(obj)] = (obj, new)
        new = done[id(obj)][1]
        return obj if new is None else new

    def rebuilt(f, depth=3):
        if depth == 0:
            return None
        if isinstance(f, functools.partial):
            inner = rebuilt(f.func, depth - 1) or f.func
            new = functools.partial(inner, *map(swap, f.args),
                                    **{k: swap(v) for k, v in f.keywords.items()})
            return new if inner is not f.func or any(
                a is not b for a, b in zip(new.args, f.args)) or any(
                new.keywords[k] is not v for k, v in f.keywords.items()) else None
        if inspect.ismethod(f):
            owner = swap(f.__self__)
            return types.MethodType(f.__func__, owner) if owner is not f.__self__ else None
        if not isinstance(f, types.FunctionType):
            return None
        cells, changed = [], False
        for cell in f.__closure__ or ():
            try:
                held = cell.cell_contents
            except ValueError:  # an empty cell
                cells.append(cell)
                continue
            new = swap(held)
            if new is held and isinstance(held, (types.FunctionType, functools.partial)):
                new = rebuilt(held, depth - 1) or held  # a function it calls, closing over a model
            changed |= new is not held
            cells.append(types.CellType(new) if new is not held else cell)
        names = {name: f.__globals__[name] for name in code_names(f.__code__)
                 if name in f.__globals__}
        swapped = {name: swap(value) for name, value in names.items()}
        swapped = {name: value for name, value in swapped.items() if value is not names[name]}
        if not changed and not swapped:
            return None
        namespace = {**f.__globals__, **swapped} if swapped else f.__globals__
        new = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__,
                                 tuple(cells) if f.__closure__ else None)
        new.__kwdefaults__ = f.__kwdefaults__
        return new

    return rebuilt(fn)


def user_frames(tb) -> list:
    """The user's own functions that were running when an exception was raised, outermost
    first, from its traceback ``tb``: each a :class:`Running` (how to name the function, the
    positional arguments it got and the objects its code names through closure cells and
    globals, each by name). Frames of nbderiv, the frameworks and the standard library are
    left out; nothing is called.

    >>> mask = [1, 2]
    >>> def model(z):
    ...     return z + mask
    >>> try:
    ...     model(None)
    ... except TypeError as exc:
    ...     running = user_frames(exc.__traceback__)[-1]
    >>> running.function, running.arguments, running.held
    ('model()', [('z', None)], [('mask', [1, 2])])
    """
    found = []
    while tb is not None:
        frame, tb = tb.tb_frame, tb.tb_next
        module = str(frame.f_globals.get("__name__") or "").split(".")[0]
        if module in _NOT_USER or frame.f_code.co_filename.startswith(_NBDERIV):
            continue
        code, values = frame.f_code, frame.f_locals
        arguments = [(n, values[n]) for n in code.co_varnames[:code.co_argcount] if n in values]
        held = [(n, values[n]) for n in code.co_freevars if n in values]
        g = frame.f_globals
        held += [(n, g[n]) for n in sorted(code_names(code)) if n in g and n not in values]
        name = getattr(code, "co_qualname", code.co_name)
        found.append(Running("the lambda" if code.co_name == "<lambda>" else f"{name}()",
                             arguments, [(n, v) for n, v in held if not isinstance(v, _SKIP)]))
    return found


class Running(NamedTuple):
    """One of the user's functions in a traceback (see :func:`user_frames`)."""

    function: str     # how a message names it: 'the lambda', 'forward()', 'Net.forward()'
    arguments: list   # (name, object): the positional arguments it got
    held: list        # (name, object): its closure cells and the globals its code names
