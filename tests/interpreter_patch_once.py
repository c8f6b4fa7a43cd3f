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
    """Wraps the interpreter's `_patch_lang`; returns whether it did (not where triton, or the interpreter's
    `_patch_lang` and `_LangPatchScope`, are missing, or where it is wrapped already). For processes that
    set TRITON_INTERPRET=1, before or after importing triton."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_class is None or getattr(original, "_patched_once", False):
        return False
    patched = set()  # the functions whose triton.language is patched in the launch under way

    def patch_lang(fn):
        if fn in patched:
            return scope_class()
        scope = patch_lang.original(fn)
        if not patched:  # the launch's own patch (GridExecutor): its restore ends the launch
            restore = scope.restore

            def restore_and_forget():
                patched.clear()
                restore()

            scope.restore = restore_and_forget
        patched.add(fn)
        return scope

    patch_lang._patched_once = True
    patch_lang.original = original
    interpreter._patch_lang = patch_lang
    return True
