"""Make the Triton interpreter run loops with runtime bounds under NumPy >= 2.4.

The interpreter holds every scalar as a one-element array and converts loop bounds with
``int(array)``, which NumPy 2.4 rejects for arrays with ndim > 0 ("only 0-dimensional arrays can
be converted to Python scalars"), so ``for i in range(0, n, BLOCK)`` with a runtime ``n`` fails.
This re-registers ``__index__`` to read the single element instead; the Triton backend imports
it, so ``backend="triton"`` on CPU tensors works for users as it does in the tests.
"""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_with_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if not getattr(_patch_lang_tensor, "_reads_single_element", False):
        _patch_lang_tensor_with_index._reads_single_element = True
        _interpreter._patch_lang_tensor = _patch_lang_tensor_with_index
