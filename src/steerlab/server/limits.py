"""The API's documented bounds, in one import-free place (docs/server.md lists them too)."""

MAX_PROMPT_CHARS = 4000  # prompt / message text
MAX_NEW_TOKENS = 1024  # max_length, max_tokens
MAX_VECTORS = 8  # steering entries per request
STRENGTH_LIMIT = 20.0  # |strength|, residual-norm units
MAX_LAYERS_PER_ENTRY = 64
MAX_CONTRAST_TEXTS = 64  # per side, POST /vectors
MAX_CONTRAST_CHARS = 2000  # per contrast text
MAX_MESSAGES = 64  # /v1/chat/completions
