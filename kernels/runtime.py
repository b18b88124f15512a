"""When and how the Triton kernels of minid.kernels are built.

Triton decides between compiling a kernel for the GPU and running it in its NumPy interpreter
(`TRITON_INTERPRET=1`, how the tests run the kernels on CPU tensors) at the moment a function is
wrapped by `triton.jit`. The kernels here are wrapped at their first launch instead of at import, so
that

- a test module can set `TRITON_INTERPRET=1` even when another module imported minid (and these
  files) earlier in the same process, and
- the PyTorch references beside each kernel import on machines without Triton.

Triton itself is imported at that first launch too: triton.language builds its own jit functions
(tl.zeros, tl.max, ...) at import, compiled or interpreted according to the variable at that moment,
so the kernel files name `tl` only in kernel bodies (and in string annotations, `from __future__
import annotations`).

How a kernel finds `tl` and its helpers. `@lazy_jit` marks both kernels and the `@triton.jit`
helpers they call (as tutorial 06 calls `_attn_fwd_inner`); it returns a `LazyKernel` that holds the
plain Python function. At the first launch, `LazyKernel.jitted` gives `triton.jit` a copy of the
function whose globals are a namespace of its own: the module's globals, with

- `tl` bound to triton.language,
- every `LazyKernel` the function names replaced by that helper's jitted function (built first, the
  same way, so a helper may call helpers; each is built once and shared by all its callers), since
  Triton inlines a call only to a jitted function, and
- every int or float of the module the function names (`LOG2E`) wrapped in `tl.constexpr`, since
  Triton lets a kernel read no other kind of global. The namespace is a snapshot taken at the first
  launch, which is what a constexpr means.

The module itself is never written to: its `tl` stays None and its helper names stay `LazyKernel`s,
so the result does not depend on which kernel launches first.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types

import torch


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (it is only published for Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter, which accepts CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can take these tensors: CUDA tensors, or CPU tensors under the
    interpreter."""
    if not triton_available():
        return False
    return all(t.is_cuda for t in tensors) or (
        interpreting() and all(t.device.type == "cpu" for t in tensors)
    )


class LazyKernel:
    """A Triton kernel or helper function, handed to `triton.jit` at the first launch of a kernel
    that uses it.

    Launch a kernel as `kernel[grid](*args)`; a helper is called by name from a kernel body.
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted = None

    def __getitem__(self, grid):
        return self.jitted()[grid]

    def jitted(self):
        """The `triton.jit` function, built on the first call (see the module docstring)."""
        if self._jitted is None:
            import triton
            import triton.language as tl

            _check_interpreter_mode(tl)
            self._jitted = triton.jit(_with_globals(self.fn, _kernel_namespace(self.fn, tl)))
        return self._jitted


def _kernel_namespace(fn, tl) -> dict:
    """fn's module globals as a Triton kernel must see them: `tl` bound, helpers jitted, numbers
    constexpr."""
    namespace = dict(fn.__globals__)
    namespace["tl"] = tl
    # co_names lists every global the code reads (with attribute names, which no global lookup asks
    # for).
    for name in fn.__code__.co_names:
        value = namespace.get(name)
        if isinstance(value, LazyKernel):
            namespace[name] = value.jitted()
        elif isinstance(value, (int, float)):
            namespace[name] = tl.constexpr(value)
    return namespace


def _with_globals(fn, namespace: dict):
    """A copy of fn that reads its globals from `namespace`; Triton reads the source through
    fn.__code__."""
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__
    copy.__annotations__ = fn.__annotations__  # the `tl.constexpr` marks of the parameters
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__doc__ = fn.__doc__
    return copy


def _check_interpreter_mode(tl) -> None:
    """triton.language's own jit functions (tl.zeros, tl.max, ...) are built when it is imported,
    compiled or interpreted by TRITON_INTERPRET at that moment; a kernel interpreted with them
    compiled fails obscurely."""
    from triton.runtime.interpreter import InterpretedFunction

    if interpreting() != isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError(
            f"minid/kernels/runtime.py: TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} "
            f"now but was "
            f"different when triton.language was imported, so Triton's own functions and minid's "
            f"kernels would "
            f"disagree. Set TRITON_INTERPRET before anything imports triton (first lines of the "
            f"test module)."
        )


def lazy_jit(fn) -> LazyKernel:
    """`@triton.jit`, deferred to the first launch: for kernels and for the helpers they call
    alike."""
    return LazyKernel(fn)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for the kernels' `tl.dot` calls on inputs of this dtype.

    UPCAST: under the Triton 3.9 interpreter a `tl.dot` of bf16 tiles returns garbage (the
    interpreter holds bf16 as uint16 and multiplies the integers), so there the kernels convert
    tiles to fp32 before each dot (after rounding P to bf16, as the GPU path does). PRECISION: fp32
    inputs use "ieee" so that fp32 is a true reference on GPUs that would otherwise use TF32 (10-bit
    mantissa); fp16/bf16 ignore it.
    """
    upcast = dtype == torch.bfloat16 and interpreting()
    precision = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return upcast, precision
