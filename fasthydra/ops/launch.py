"""Kernel launches with less host work than Triton's ``kernel[grid](...)``.

A small training step is host-bound on a GPU (bench/RESULTS.md), and Triton's JIT launch is a large part of
its host time: every call binds the arguments to the signature, specialises each one in C
(``native_specialize_impl``: its type, a pointer's 16-byte alignment, an integer's divisibility by 16 and
whether it equals 1), builds a cache key of the result and reads several knobs. On the lent H200's host a
profiled launch of the small step's 30-argument kernel took about 150 us, the launcher itself 40 of them.

``launch(kernel, grid, *args, **kwargs)`` does what ``kernel[grid](*args, **kwargs)`` does. The first call
for a given (device, argument properties, constexprs, options) goes through Triton's own path, which compiles
or finds the kernel; the compiled kernel it returns is kept under a key built here in Python (``args_key``: a
tensor's dtype and address modulo 16, an int's value, a float's type), so that every later call with an equal
key launches it directly: the compiled kernel's own launcher, with the same arguments in the same order as
Triton's ``JITFunction.run`` passes them. The key is a refinement of Triton's: two calls with equal keys have
equal Triton specialisations (tests/test_launch.py checks it against the installed Triton's specialiser), so the
kernel launched is the one Triton would have launched.

Triton's own path is taken instead: under the interpreter; for Triton versions whose launch convention was
not checked here (``FAST_LAUNCH_TRITON``); while a launch hook, a pre-run hook or a stages-inspection hook is
set (profilers such as Proton use them); for an argument of a type the key does not model; and everywhere
with ``FASTHYDRA_FAST_LAUNCH=0`` (or ``FAST_LAUNCH = False``).
"""

from __future__ import annotations

import functools
import os

import torch

from . import _common

FAST_LAUNCH = os.environ.get("FASTHYDRA_FAST_LAUNCH", "1") != "0"

# Triton versions whose JITFunction.run was read for this module (3.6 to 3.9, the same in each): the compiled
# kernel's launcher takes (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit
# hook, *every argument, constexprs included, in signature order); launch metadata is None when no enter hook
# is set.
FAST_LAUNCH_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))

_PLAIN = (int, float, bool, str, type(None))  # argument types whose key entry is exact (see args_key)
_MAX_KEYS = 4096  # per kernel: a process whose shapes never repeat clears the cache rather than grow it


@functools.lru_cache(maxsize=None)
def _triton_modules():
    """(triton.knobs, triton.runtime.driver), imported once: an import statement costs a lookup per launch."""
    from triton import knobs
    from triton.runtime import driver

    return knobs, driver


def _hook_set(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6 to 3.9 keep an empty ``HookChain`` there by default (a hook set
    joins its ``calls``); older versions keep None."""
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else hook is not None


def args_key(args: tuple) -> tuple:
    """The key's part for the positional arguments, each one's entry:
    - a tensor (or a Parameter): its dtype and its address modulo 16 (Triton: the dtype, 16-byte alignment);
    - an int: its value (Triton: i32 / i64 / u64 by range, divisible by 16, equal to 1: all functions of it);
    - a float: the type alone (Triton does not specialise floats; the value changes with an annealed T);
    - anything else: (type, value), so that True and 1 differ (Triton: u1 against a constant 1).
    A type the key does not model exactly is never cached (``_cacheable``)."""
    tensor, param = torch.Tensor, torch.nn.Parameter
    return tuple([(v.dtype, v.data_ptr() & 15) if (t := type(v)) is tensor or t is param
                  else v if t is int else t if t is float else (t, v) for v in args])


class _Launcher:
    """One kernel's compiled launches by key (see the module's docstring)."""

    __slots__ = ("jit", "names", "constexpr", "defaults", "compiled")

    def __init__(self, jit):
        self.jit = jit
        params = jit.params
        self.names = tuple(p.name for p in params)
        self.constexpr = tuple(bool(p.is_constexpr) for p in params)
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.compiled = {}

    def _tail(self, args: tuple, kwargs: dict):
        """The arguments after the positional ones, in signature order (keywords and defaults), or None where
        the key cannot stand for them: a keyword argument that is not a plain value, a float or a tensor
        given positionally where the kernel wants a constexpr, a positional argument of a type the key does
        not model."""
        tensor, param = torch.Tensor, torch.nn.Parameter
        for v, const in zip(args, self.constexpr):
            t = type(v)
            if (const and t not in (int, bool, str, type(None))) or not (t in _PLAIN or t is tensor or t is param):
                return None
        if len(args) > len(self.names) or not all(type(v) in _PLAIN for v in kwargs.values()):
            return None
        tail = []
        for name in self.names[len(args):]:
            if name in kwargs:
                tail.append(kwargs[name])
            elif name in self.defaults:
                tail.append(self.defaults[name])
            else:
                return None  # (a missing argument: Triton's path raises its own error)
        return tuple(tail)

    def __call__(self, grid, args, kwargs):
        knobs, driver = _triton_modules()
        rt = knobs.runtime
        if (self.jit.pre_run_hooks or _hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook)
                or rt.add_stages_inspection_hook is not None):
            return self.jit[grid](*args, **kwargs)
        active = driver.active
        device = active.get_current_device()
        key = (device, rt.debug, knobs.compilation.instrumentation_mode, args_key(args), tuple(kwargs.items()))
        try:
            entry = self.compiled.get(key)
        except TypeError:  # (an unhashable argument)
            return self.jit[grid](*args, **kwargs)
        if entry is None:
            kernel = self.jit[grid](*args, **kwargs)
            tail = self._tail(args, kwargs)
            if tail is not None and kernel is not None and hasattr(kernel, "packed_metadata"):
                if len(self.compiled) >= _MAX_KEYS:
                    self.compiled.clear()
                self.compiled[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
            return kernel
        run, function, packed, tail = entry
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device), function,
            packed, None, None, None, *args, *tail)
        return None


_LAUNCHERS: dict = {}
_SUPPORTED: list = []  # [whether this process's Triton and mode allow the direct path], decided once


def fast_launch_enabled() -> bool:
    """Whether ``launch`` may take its direct path (see the module's docstring)."""
    if not FAST_LAUNCH:
        return False
    if not _SUPPORTED:  # (the interpreter is chosen before triton is imported: it cannot change later)
        _SUPPORTED.append(not _common.interpreting() and _common._triton_version() in FAST_LAUNCH_TRITON)
    return _SUPPORTED[0]


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with Triton's per-call binding and specialisation done once per
    distinct key (see the module's docstring). grid: a tuple of 1 to 3 ints."""
    if not fast_launch_enabled():
        return kernel[grid](*args, **kwargs)
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None or launcher.jit is not kernel:
        launcher = _LAUNCHERS[id(kernel)] = _Launcher(kernel)
    return launcher(grid, args, kwargs)
