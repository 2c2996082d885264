"""The one compiled module, ``quotewatch.domain.market._orderbook`` (Cython -> C++); all else is in pyproject.toml.

Built by every install (``make setup``, ``pip install .``); needs a C++ compiler (g++).
libstdc++ is linked statically, so the module runs on the slim runtime image without it.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "quotewatch.domain.market._orderbook",
                ["src/quotewatch/domain/market/_orderbook.pyx"],
                language="c++",
                extra_compile_args=["-O2", "-std=c++17"],
                extra_link_args=["-static-libstdc++"],
            )
        ],
        compiler_directives={"language_level": "3"},
    )
)
