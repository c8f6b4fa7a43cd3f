"""A faster Triton interpreter for the CPU tests: triton.language is patched once per function per launch.

Triton's interpreter (3.6 to 3.9) patches triton.language's builtins to interpreted ones when a kernel is
launched (undone when the launch ends), and again at every call of a @triton.jit helper from inside it:
`_patch_lang(fn)` walks the members of triton.language, its tensor class and tl.math with inspect.getmembers
each time. Our kernels call their helpers (the online log-sum-exp, the logit transform, ...) in every block
of every program, and that re-patching was about 40% of the interpreter's time in the kernel tests (cProfile
over test_focal_po_loss.py and test_kernel_properties.py). A second call for the same function within the
same launch finds nothing left to patch (the builtins are its wrappers already) and re-sets the same tensor
attributes, so `install` skips it: the first call of each function in a launch patches as before, later
calls return an empty scope. Nothing the kernels compute changes; the library never imports this.
"""

from __future__ import annotations


def install() -> bool:
    """Wraps the interpreter's `_patch_lang` and its launches (`GridExecutor.__call__`); returns whether it
    did (not where triton, or those interpreter internals, are missing, or where it is wrapped already). For
    processes that set TRITON_INTERPRET=1, before or after importing triton. Outside a launch (a @triton.jit
    function called from host code) every call patches, as Triton does."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if None in (original, scope_class, executor) or getattr(original, "_patched_once", False):
        return False
    launch = executor.__call__
    patched = set()  # the functions whose triton.language is patched in the launch under way
    depth = [0]  # launches under way

    def patch_lang(fn):
        if depth[0] and fn in patched:
            return scope_class()
        scope = patch_lang.original(fn)
        if depth[0]:
            patched.add(fn)
        return scope

    def launch_once_patched(self, *args, **kwargs):
        depth[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:  # the launch has undone its patch (an exception included): everything patches afresh
            depth[0] -= 1
            patched.clear()

    patch_lang._patched_once = True
    patch_lang.original = original
    interpreter._patch_lang = patch_lang
    executor.__call__ = launch_once_patched
    return True
