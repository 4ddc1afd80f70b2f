"""A recording test double of the few `habana_frameworks` functions the HPU backend uses.

Never installed: tests put `tests/fakes` on the path (in-process through a fixture, in subprocesses
through PYTHONPATH). `IS_TEST_FAKE` tells the backend to keep tensors on the CPU and use gloo;
every other answer of the backend is the real HPU one.
"""

IS_TEST_FAKE = True
