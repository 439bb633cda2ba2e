"""Model, data and evaluation code shared by the server and the clients (imports neither)."""

import logging

# peft imports bitsandbytes (the `quantization` extra) in every process. On CPUs with
# AVX512-BF16 bitsandbytes then tries to fetch an optional CPU kernel from the Hugging Face
# hub at import (through the `kernels` package) and warns when it cannot, which it never
# can offline; its own slower kernel is used. Only those two loggers are raised to ERROR,
# so real bitsandbytes errors show (and a CLI error stays one line).
for _noisy in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
