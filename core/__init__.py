"""Model, data and evaluation code shared by the server and the clients (imports neither)."""

import logging

# peft imports bitsandbytes (the `quantization` extra) in every process. On CPUs with
# AVX512-BF16 bitsandbytes then tries to fetch an optional CPU kernel from the Hugging Face
# hub at import and warns when it cannot, which it never can offline; its own slower
# kernel is used. Only that logger is raised to ERROR, so real bitsandbytes errors show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
