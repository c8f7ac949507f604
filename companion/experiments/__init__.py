"""The book's experiments: what the chapters run to show something.

One module per topic: toy models, batch builders, sweeps, comparison
tables, reports, the two-process data-parallel demo, readers of the
benchmark's results, and the helpers that show numbers and source code in
the book (:mod:`~companion.experiments.display`,
:mod:`~companion.experiments.source`).  They import the library (the other
modules of :mod:`companion`), which never imports them.

This is not an API: names here change when a chapter changes.  What a reader
would copy into a training loop is the library.
"""
