"""A recording stand-in of Habana's bridge (`habana_frameworks`): what the HPU backend and the REAL
optimum-habana 1.21.2 (requirements-hpu-test.txt) import and call, on CPU tensors.

Why a double stays here (issue #28 retired the hand-written optimum-habana one): the bridge ships with
Habana's Gaudi images and loads only there, against the card's driver and Habana's build of torch; no real
package can serve a CPU test run. Its HPU-graph semantics (one capture per input signature, inputs
copied in, outputs aliased) follow the bridge's, as `torch/hpu` describes.

Never installed: tests put `tests/fakes` on the path (in-process through a fixture, in subprocesses
through PYTHONPATH). `IS_TEST_FAKE` tells the backend to keep tensors on the CPU and use gloo;
every other answer of the backend is the real HPU one.
"""

IS_TEST_FAKE = True
