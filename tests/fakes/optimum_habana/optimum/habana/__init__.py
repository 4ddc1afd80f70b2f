"""A test double of the parts of optimum-habana the HPU backend uses (`adapt_transformers_to_gaudi`,
the lazy-mode activation-checkpointing function) and of one patched class, `GaudiLlamaForCausalLM`,
emulating how optimum-habana 1.21's behaves. Never installed: the `fake_optimum_habana` fixture puts
`tests/fakes/optimum_habana` on the path and undoes the patch afterwards."""

IS_TEST_FAKE = True
