"""The old path of :mod:`jitrope.eval.evaluate`: ``python -m jitrope.evaluate`` runs it, and
``import jitrope.evaluate`` gives that module itself."""

import importlib
import sys

_module = importlib.import_module("jitrope.eval.evaluate")
if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
